//! The tabs' drawing and interaction. State lives in [`FluoroApp`]; these functions only read
//! it, draw, and turn clicks into calls on it.

use super::{COLOURS, Compare, FluoroApp, Tab, TrainingRun};
use crate::landmarks::{LANDMARKS, Landmarks2d, N_LANDMARKS};
use crate::task::Task;
use eframe::egui::{self, Color32, Pos2, Rect, Stroke, Vec2};
use nalgebra::Point2;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub fn top_bar(app: &mut FluoroApp, ui: &mut egui::Ui) {
    egui::Panel::top("tabs").show(ui, |ui| {
        ui.horizontal(|ui| {
            ui.heading("fluoropose");
            ui.separator();
            for (t, name) in [
                (Tab::Live, "Live"),
                (Tab::Ct, "CT"),
                (Tab::Annotate, "Annotate"),
                (Tab::Train, "Train"),
            ] {
                ui.selectable_value(&mut app.tab, t, name);
            }
        });
    });
}

pub fn status_bar(app: &mut FluoroApp, ui: &mut egui::Ui) {
    egui::Panel::bottom("status").show(ui, |ui| {
        ui.horizontal(|ui| {
            ui.label(format!("CT: {}", app.scene.name));
            ui.separator();
            ui.label(app.gpu_status().to_string());
            // Which network runs matters as much as where: on 2 cores the Live tab starts on
            // the compact one, and the picker that says so sits below the right panel's fold.
            if let Some(name) = app.network_name() {
                ui.separator();
                ui.label(format!("network: {name}"))
                    .on_hover_text("the U-Net the Live tab runs; pick another under \"weights\"");
            }
            if let Some(n) = app.ct_loading() {
                ui.separator();
                waiting(ui);
                ui.label(format!("loading {n}"));
            }
        });
    });
}

/// A spinner that turns at 10 frames a second. egui's own asks for a repaint every frame, which
/// keeps a software-rendered window (lavapipe) redrawing at full rate and takes the cores from
/// the model load or CT load being waited for; this one asks again after 100 ms.
fn waiting(ui: &mut egui::Ui) {
    let side = ui.spacing().interact_size.y;
    let (rect, _) = ui.allocate_exact_size(Vec2::splat(side), egui::Sense::hover());
    if ui.is_rect_visible(rect) {
        let t = (ui.input(|i| i.time) * 10.0).floor() / 10.0;
        let start = t * std::f64::consts::TAU / 1.5;
        let radius = rect.height() / 2.0 - 2.0;
        let points: Vec<Pos2> = (0..=24)
            .map(|i| {
                let a = (start + f64::from(i) / 24.0 * std::f64::consts::PI * 1.5) as f32;
                rect.center() + radius * Vec2::angled(a)
            })
            .collect();
        ui.painter().add(egui::Shape::line(
            points,
            Stroke::new(3.0, ui.visuals().strong_text_color()),
        ));
    }
    ui.ctx()
        .request_repaint_after(std::time::Duration::from_millis(100));
}

pub fn toasts(app: &mut FluoroApp, ctx: &egui::Context) {
    app.toasts.retain(|t| t.at.elapsed().as_secs_f64() < 8.0);
    if app.toasts.is_empty() {
        return;
    }
    egui::Area::new(egui::Id::unique("toasts"))
        .anchor(egui::Align2::RIGHT_BOTTOM, Vec2::new(-12.0, -40.0))
        .show(ctx, |ui| {
            for t in &app.toasts {
                egui::Frame::popup(ui.style()).show(ui, |ui| {
                    let c = if t.error {
                        Color32::LIGHT_RED
                    } else {
                        Color32::LIGHT_GREEN
                    };
                    ui.colored_label(c, &t.text);
                });
            }
        });
    ctx.request_repaint_after(std::time::Duration::from_millis(500));
}

/// Fits a `w x h` image into `avail`, keeping its aspect.
fn fit(avail: Vec2, w: f32, h: f32) -> Vec2 {
    let s = (avail.x / w).min(avail.y / h).max(0.01);
    Vec2::new(w * s, h * s)
}

fn to_screen(rect: Rect, size: (usize, usize), p: Point2<f64>) -> Pos2 {
    // Pixel centres: pixel i spans [i, i+1) in image units.
    Pos2::new(
        rect.min.x + ((p.x + 0.5) as f32) * rect.width() / size.0 as f32,
        rect.min.y + ((p.y + 0.5) as f32) * rect.height() / size.1 as f32,
    )
}

fn from_screen(rect: Rect, size: (usize, usize), p: Pos2) -> Point2<f64> {
    Point2::new(
        ((p.x - rect.min.x) * size.0 as f32 / rect.width()) as f64 - 0.5,
        ((p.y - rect.min.y) * size.1 as f32 / rect.height()) as f64 - 0.5,
    )
}

fn marker(painter: &egui::Painter, at: Pos2, i: usize, label: &str) {
    let c = COLOURS[i];
    painter.circle_stroke(at, 6.0, Stroke::new(2.0, c));
    marker_label(painter, at, label, c);
}

/// A marker's label, up and to the right of it, or to the left near the right edge of what the
/// painter may draw on (else the frame's edge would cut it).
fn marker_label(painter: &egui::Painter, at: Pos2, label: &str, c: Color32) {
    let font = egui::FontId::monospace(11.0);
    let width = painter
        .layout_no_wrap(label.to_string(), font.clone(), c)
        .size()
        .x;
    let (pos, align) = if at.x + 8.0 + width > painter.clip_rect().max.x {
        (at + Vec2::new(-8.0, -8.0), egui::Align2::RIGHT_BOTTOM)
    } else {
        (at + Vec2::new(8.0, -8.0), egui::Align2::LEFT_BOTTOM)
    };
    painter.text(pos, align, label, font, c);
}

/// A refinement under way: its frame, its time so far, the DRRs it has rendered and the run it
/// is on, and a button that stops it (on a CPU's software renderer one can take many seconds).
fn refining_line(ui: &mut egui::Ui, r: &super::Refining) {
    let (drrs, _, run) = r.task.progress();
    ui.horizontal_wrapped(|ui| {
        ui.spinner();
        let run = if run.is_empty() {
            String::new()
        } else {
            format!(" ({run})")
        };
        ui.label(format!(
            "refining frame {} against the CT: {:.1} s, {drrs} DRRs{run}",
            r.index,
            r.started.elapsed().as_secs_f64()
        ));
    });
    if section(ui, "live-refining", |ui| ui.button("Cancel refinement"))
        .on_hover_text(
            "Stop refining this frame: its pose stays the landmarks' (it is not refined again \
             while it is the frame shown).",
        )
        .clicked()
    {
        r.task.cancel();
    }
    // The time and the count move while no frame arrives (a paused stream).
    ui.ctx()
        .request_repaint_after(std::time::Duration::from_millis(250));
}

/// The Pose panel's lines for a refinement: its pose, how well the DRR matches, and with the
/// simulated stream its error.
fn refined_lines(app: &FluoroApp, ui: &mut egui::Ui, r: &super::RefinedPose, shown: u64) {
    let age = if r.index == shown {
        "this frame".to_string()
    } else {
        format!("frame {}", r.index)
    };
    ui.monospace(format!(
        "refined ({age}, {:.0} ms, similarity {:.3} → {:.3})\n{}",
        r.ms,
        r.similarity.0,
        r.similarity.1,
        pose_lines("", &r.pose)
    ));
    if !r.trusted() {
        ui.label(format!(
            "not used: under similarity {}, the DRR does not match the frame (another \
             optimum, or another CT)",
            crate::registration::intensity::RESTART_BELOW
        ));
    }
    if let Some(t) = &r.truth {
        let pts = app.scene.landmarks.present();
        let tre = |p: &crate::geometry::Pose| crate::registration::metrics::mean_tre_mm(p, t, &pts);
        ui.label(format!(
            "refined error: {:.2}° rotation, {:.1} mm TRE (landmarks' {:.1} mm)",
            crate::registration::metrics::rotation_error_deg(&r.pose, t),
            tre(&r.pose),
            tre(&r.from)
        ));
    }
}

/// A labelled drop-down of `options` (named by `name`) setting `value`; whether it changed.
fn choice<T: Copy + PartialEq>(
    ui: &mut egui::Ui,
    label: &str,
    value: &mut T,
    options: &[T],
    name: fn(T) -> &'static str,
    hover: &str,
) -> bool {
    let mut changed = false;
    ui.horizontal(|ui| {
        ui.label(label);
        egui::ComboBox::from_id_salt(label)
            .selected_text(name(*value))
            .show_ui(ui, |ui| {
                for &o in options {
                    changed |= ui.selectable_value(value, o, name(o)).changed();
                }
            })
            .response
            .on_hover_text(hover);
    });
    changed
}

/// Lays out `add` in a scope whose widget ids do not depend on what `ui` drew before it.
///
/// egui names a widget without an id of its own by its place among its siblings. The Live tab's
/// lines come and go from frame to frame (warnings, a refinement's progress, the errors against
/// the simulated truth, a recorded source's seek slider), which would rename every switch after
/// them, and a click arriving in such a frame (a mouse's or AccessKit's) would reach the old name
/// and be lost. The id is global: a `name` is laid out at most once a frame.
fn section<R>(ui: &mut egui::Ui, name: &str, add: impl FnOnce(&mut egui::Ui) -> R) -> R {
    let id = egui::Id::unique(("fluoropose-section", name));
    ui.scope_builder(egui::UiBuilder::new().scope_id(id), add)
        .inner
}

/// A pose as two lines, `r` in degrees and `t` in mm, each name after `prefix`.
fn pose_lines(prefix: &str, pose: &crate::geometry::Pose) -> String {
    let v = pose.params();
    // Without a prefix the names are padded so that the "=" line up with "true r =".
    let pad = if prefix.is_empty() { " " } else { "" };
    format!(
        "{prefix}r{pad} = ({:+.1}°, {:+.1}°, {:+.1}°)\n{prefix}t{pad} = ({:+.1}, {:+.1}, {:+.1}) mm",
        v[0].to_degrees(),
        v[1].to_degrees(),
        v[2].to_degrees(),
        v[3],
        v[4],
        v[5]
    )
}

fn cross(painter: &egui::Painter, at: Pos2, c: Color32) {
    let d = 5.0;
    painter.line_segment(
        [at - Vec2::new(d, d), at + Vec2::new(d, d)],
        Stroke::new(1.5, c),
    );
    painter.line_segment(
        [at - Vec2::new(d, -d), at + Vec2::new(d, -d)],
        Stroke::new(1.5, c),
    );
}

fn transport(app: &mut FluoroApp, ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        let label = if app.playing { "Pause" } else { "Play" };
        if ui.button(label).clicked() {
            let p = !app.playing;
            app.set_playing(p);
        }
        if ui.button("Step").clicked() {
            app.set_playing(false);
            app.send(super::Command::Step);
        }
        if let Some(p) = &app.latest
            && let Some(n) = p.count
        {
            let mut i = p.index;
            if ui
                .add(egui::Slider::new(&mut i, 0..=n.saturating_sub(1)).text("frame"))
                .changed()
            {
                app.send(super::Command::Seek(i));
            }
        }
        // The seek slider shows for a recorded source only: what follows keeps its ids when it
        // comes or goes.
        section(ui, "transport", |ui| {
            let mut fps = app.settings.fps;
            if ui
                .add(egui::Slider::new(&mut fps, 1.0..=60.0).text("fps"))
                .changed()
            {
                app.settings.fps = fps;
                app.send(super::Command::Fps(fps));
            }
            if ui.checkbox(&mut app.settings.looping, "loop").changed() {
                app.send(super::Command::Loop(app.settings.looping));
            }
            ui.separator();
            if ui.button("Open frames…").clicked()
                && let Some(p) = rfd::FileDialog::new().pick_file()
            {
                app.open_frames(p);
            }
            if ui.button("Open folder…").clicked()
                && let Some(p) = rfd::FileDialog::new().pick_folder()
            {
                app.open_frames(p);
            }
            if ui.button("Simulated").clicked() {
                app.open_simulated();
            }
            let l = ui.label("dose (photons/px)");
            let r = ui
                .add(
                    egui::DragValue::new(&mut app.settings.photons)
                        .range(0.0..=1e7)
                        .speed(1000.0),
                )
                .labelled_by(l.id)
                .on_hover_text(DOSE_HOVER);
            if r.lost_focus() || r.drag_stopped() {
                app.open_simulated();
            }
        });
    });
}

pub fn live(app: &mut FluoroApp, ui: &mut egui::Ui) {
    transport(app, ui);
    let ctx = ui.ctx().clone();
    let Some(p) = app.latest.clone() else {
        waiting(ui);
        ui.label("waiting for the first frame");
        return;
    };
    egui::Panel::right("pose").min_size(300.0).show(ui, |ui| {
        // The panel outgrows short windows: it scrolls.
        egui::ScrollArea::vertical().show(ui, |ui| {
        if let Some(score) = p.unsure_score() {
            ui.colored_label(UNSURE_COLOUR, unsure_text(score))
                .on_hover_text(UNSURE_HOVER);
        }
        if let Some(n) = p.noise.filter(|n| n.smoothed_px > 0.0) {
            ui.colored_label(ui.visuals().warn_fg_color, noise_text(&n))
                .on_hover_text(NOISE_HOVER);
        }
        if p.truth.is_none() && app.scene.is_phantom() {
            // Opened frames solved against a phantom: right for the project's own recordings,
            // wrong for a patient's, and the app cannot tell which.
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!(
                    "CT: {} (a phantom): the pose and the DRR assume these frames show it",
                    app.scene.name
                ),
            )
            .on_hover_text(
                "The pose is solved against the loaded CT's landmarks and the DRR is rendered \
                 from it. For a patient's frames, load that patient's CT in the CT tab.",
            );
        }
        ui.heading("Pose");
        match &p.solution {
            Some(s) => {
                ui.label(format!(
                    "status: {:?}{}",
                    s.status,
                    if p.inverted {
                        " · frame read inverted (bone dark)"
                    } else {
                        ""
                    }
                ));
                ui.monospace(pose_lines("", &s.pose));
                ui.label(format!("reprojection RMSE {:.2} px", s.rmse_px));
                if let Some(tr) = &p.tracked {
                    let sd = |i: usize| tr.covariance[(i, i)].max(0.0).sqrt();
                    ui.monospace(format!(
                        "tracked ± {:.1}°, {:.1} mm depth{}\n{}",
                        (sd(0).powi(2) + sd(1).powi(2) + sd(2).powi(2)).sqrt().to_degrees(),
                        sd(5),
                        if tr.restarted {
                            " (restarted)"
                        } else if !tr.measured {
                            " (predicted: this frame's solve not used)"
                        } else {
                            ""
                        },
                        pose_lines("", &tr.pose)
                    ));
                }
                if let Some(t) = &p.truth {
                    ui.monospace(pose_lines("true ", t));
                    let pts = app.scene.landmarks.present();
                    let err = |pose: &crate::geometry::Pose| {
                        format!(
                            "{:.2}° rotation, {:.1} mm TRE",
                            crate::registration::metrics::rotation_error_deg(pose, t),
                            crate::registration::metrics::mean_tre_mm(pose, t, &pts)
                        )
                    };
                    if s.status.ok() {
                        ui.label(format!("error: {}", err(&s.pose)));
                    }
                    if let Some(tr) = &p.tracked {
                        ui.label(format!("tracked error: {}", err(&tr.pose)));
                    }
                }
                if let Some(r) = &p.refined {
                    refined_lines(app, ui, r, p.index);
                }
                if let Some(r) = app.refining() {
                    refining_line(ui, &r);
                }
                if let Some(c) = &p.corrected
                    && p.refined.is_some_and(|r| r.index != p.index)
                {
                    ui.monospace(format!("corrected by that refinement\n{}", pose_lines("", c)));
                    if let Some(t) = &p.truth {
                        let pts = app.scene.landmarks.present();
                        ui.label(format!(
                            "corrected error: {:.2}° rotation, {:.1} mm TRE",
                            crate::registration::metrics::rotation_error_deg(c, t),
                            crate::registration::metrics::mean_tre_mm(c, t, &pts)
                        ));
                    }
                }
            }
            None => {
                ui.label("no pose (no model or no landmarks)");
            }
        }
        ui.separator();
        section(ui, "live-c-arm", |ui| camera_editor(app, ui, &p));
        ui.separator();
        ui.heading("Latency");
        ui.monospace(format!(
            "source    {:6.1} ms\ninference {:6.1} ms\npose      {:6.2} ms\nDRR       {:6.1} ms\nframe→overlay {:6.1} ms\n{:.1} fps shown, {} skipped",
            p.timings.source_ms,
            p.timings.inference_ms,
            p.timings.pose_ms,
            app.drr_ms(),
            app.latency_ms(),
            app.fps(),
            p.skipped
        ));
        ui.separator();
        ui.heading("Landmarks");
        for (i, d) in p.detections.iter().enumerate() {
            ui.colored_label(
                COLOURS[i],
                format!(
                    "{} {:>6.1} {:>6.1}  {:.2}{}",
                    LANDMARKS[i].code,
                    d.point.x,
                    d.point.y,
                    d.confidence,
                    if d.reprojected { "  (pose)" } else { "" }
                ),
            );
        }
        ui.separator();
        section(ui, "live-model", |ui| {
            ui.heading("Model");
            let mut d = false;
            d |= ui
                .checkbox(&mut app.settings.mirror, "mirror-average heatmaps")
                .on_hover_text("Average each frame's heatmaps with its mirror image's (one more image per frame)")
                .changed();
            let mut shift = app.settings.shift_views(app.shifts_fit);
            if ui
                .checkbox(&mut shift, "shift-average heatmaps")
                .on_hover_text(format!(
                    "Average each frame's heatmaps with those of it moved {} model pixels down-right \
                     and up-left (two more images per frame; fewer landmarks far off). On by default \
                     where the network runs on a GPU or 4 or more CPU threads.",
                    crate::model::Views::SHIFT_PX
                ))
                .changed()
            {
                app.settings.shift = Some(shift);
                d = true;
            }
            d |= ui
                .checkbox(&mut app.settings.denoise, "smooth noisy frames")
                .on_hover_text(format!(
                    "Blur a frame noisier than the network's training data before reading it, up to \
                     sigma {} model pixels: at fluoroscopy's low doses the network reads a smoothed \
                     frame better. Frames as clean as the training data are read as they are.",
                    crate::model::noise::SMOOTH_MAX_PX
                ))
                .changed();
            d |= ui
                .checkbox(&mut app.settings.consistent, "pose-consistent landmarks")
                .on_hover_text(
                    "Take the heatmap peaks that agree with one pose of the CT's landmarks; \
                     a landmark no peak supports is drawn dashed where the pose puts it",
                )
                .changed();
            d |= ui
                .add_enabled(
                    app.settings.consistent,
                    egui::Checkbox::new(&mut app.settings.registered, "landmarks at the pose"),
                )
                .on_hover_text(
                    "Draw every landmark where the CT's projects at the solved pose, not at its \
                     heatmap's peak: the pose averages out the network's jitter (the median error \
                     falls by about a quarter on held-out subjects); the pose itself does not change",
                )
                .changed();
            {
                use crate::detect::Polarity;
                d |= choice(
                    ui,
                    "frame polarity",
                    &mut app.settings.polarity,
                    &[Polarity::Auto, Polarity::AsIs, Polarity::Inverted],
                    Polarity::label,
                    "The network learnt DRRs, bone bright; many fluoroscopes show bone dark. \
                     Automatic reads a frame the other way round too when its landmarks are found \
                     faintly, and keeps the reading that finds them",
                );
            }
            if d {
                let decode = app.settings.decode(app.shifts_fit);
                app.send(super::Command::Decode(decode));
            }
            if ui
                .checkbox(&mut app.settings.refine, "refine the pose against the CT")
                .on_hover_text(
                    "Match DRRs of the CT to the frame (intensity, then edges) starting from the \
                     landmarks' pose, on a thread of its own: millimetre depth where the landmarks \
                     leave centimetres. Under a second a frame on a CPU (a few seconds beside the \
                     playing stream): a paused or stepped frame is refined at once and the DRR shows \
                     the refined pose, and while the C-arm holds still for a second the playing \
                     stream is refined too.",
                )
                .changed()
            {
                let volume = app.settings.refine.then(|| app.scene.density.clone());
                app.send(super::Command::Refine(volume));
            }
            ui.add_enabled_ui(app.settings.refine, |ui| {
                ui.indent("refine while playing", |ui| {
                    let mut on = app.settings.refine_while_playing(app.gpu_refines);
                    if ui
                        .checkbox(&mut on, "also while playing")
                        .on_hover_text(
                            "Refine the newest frame whenever the refinement is free, at low \
                             priority, also while the C-arm moves; later frames carry its correction \
                             while the C-arm stays within 4° for 5 s. On by default where the DRRs \
                             run on a GPU; on a CPU's software renderer it costs about a frame per \
                             second, so there, unticked, only a still C-arm's stream is refined.",
                        )
                        .changed()
                    {
                        app.settings.refine_playing = Some(on);
                        app.send(super::Command::RefineWhilePlaying(on));
                    }
                });
            });
            if ui
                .checkbox(&mut app.settings.track, "track the pose over frames")
                .on_hover_text(
                    "A Kalman filter (constant velocity) fuses each frame's solve with the last: \
                     steadier depth and tilts; a sudden move restarts it. A frame the network is \
                     unsure of is not fused (the filter predicts over it), and after a second without \
                     a fused frame the per-frame solve is shown. The DRR follows the tracked pose.",
                )
                .changed()
            {
                let on = app.settings.track;
                app.send(super::Command::Track(on));
            }
            // The picker's text is the status bar's (`network_name`); its entries are read in
            // place rather than cloned each frame.
            let mut sel = app.model_index;
            egui::ComboBox::from_label("weights")
                .selected_text(app.network_name().unwrap_or_default())
                .show_ui(ui, |ui| {
                    for (i, (n, _)) in app.models.iter().enumerate() {
                        ui.selectable_value(&mut sel, i, n);
                    }
                });
            if sel != app.model_index {
                app.select_model(sel);
            }
        });
        ui.separator();
        section(ui, "live-verification", |ui| {
            ui.heading("Verification");
            ui.horizontal(|ui| {
                ui.selectable_value(&mut app.settings.compare, Compare::SideBySide, "side by side");
                ui.selectable_value(&mut app.settings.compare, Compare::Blend, "blend");
                ui.selectable_value(&mut app.settings.compare, Compare::Checkerboard, "checker");
            });
            ui.add(egui::Slider::new(&mut app.settings.overlay_alpha, 0.0..=1.0).text("DRR opacity"));
            {
                use super::BoneShown;
                choice(
                    ui,
                    "bone drawn",
                    &mut app.settings.bone,
                    &[BoneShown::AsSource, BoneShown::Bright, BoneShown::Dark],
                    BoneShown::label,
                    "Frames and the DRR drawn bone bright (radiographs, DRRs) or bone dark (many \
                     fluoroscopes), or frames as their source stores them",
                );
            }
            ui.checkbox(&mut app.manual, "manual pose (sliders move the C-arm)");
            if app.manual {
                if let Some(s) = p.solution.as_ref().filter(|_| ui.button("start from solved pose").clicked()) {
                    let v = s.pose.params();
                    app.manual_pose = [v[0].to_degrees(), v[1].to_degrees(), v[2].to_degrees(), v[3], v[4], v[5]];
                }
                for (k, (name, range)) in [
                    ("rx °", -180.0..=180.0),
                    ("ry °", -180.0..=180.0),
                    ("rz °", -180.0..=180.0),
                    ("tx mm", -300.0..=300.0),
                    ("ty mm", -300.0..=300.0),
                    ("tz mm", 300.0..=1000.0),
                ]
                .into_iter()
                .enumerate()
                {
                    ui.add(egui::Slider::new(&mut app.manual_pose[k], range).text(name));
                }
            }
        });
        });
    });
    let frame_tex = app.frame_texture(&ctx);
    let drr = app.drr_texture(&p.camera);
    let avail = ui.available_size();
    let side = app.settings.compare == Compare::SideBySide && drr.is_some();
    let per = if side {
        Vec2::new(avail.x / 2.0 - 4.0, avail.y)
    } else {
        avail
    };
    let size = fit(per, p.size.0 as f32, p.size.1 as f32);
    ui.horizontal(|ui| {
        // Centred in the space the panels leave, instead of a band of empty space on one side.
        let used = if side {
            2.0 * size.x + ui.spacing().item_spacing.x
        } else {
            size.x
        };
        ui.add_space(((avail.x - used) / 2.0).max(0.0));
        let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
        let painter = ui.painter_at(rect);
        let uv = Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0));
        if let Some(t) = frame_tex {
            painter.image(t, rect, uv, Color32::WHITE);
        }
        if let Some((id, _)) = drr {
            let a = (app.settings.overlay_alpha * 255.0) as u8;
            match app.settings.compare {
                Compare::Blend => {
                    painter.image(id, rect, uv, Color32::from_white_alpha(a));
                }
                Compare::Checkerboard => {
                    let n = 8;
                    for cy in 0..n {
                        for cx in 0..n {
                            if (cx + cy) % 2 == 1 {
                                let (u0, v0) = (cx as f32 / n as f32, cy as f32 / n as f32);
                                let (u1, v1) =
                                    ((cx + 1) as f32 / n as f32, (cy + 1) as f32 / n as f32);
                                let r = Rect::from_min_max(
                                    rect.lerp_inside(Vec2::new(u0, v0)),
                                    rect.lerp_inside(Vec2::new(u1, v1)),
                                );
                                painter.image(
                                    id,
                                    r,
                                    Rect::from_min_max(Pos2::new(u0, v0), Pos2::new(u1, v1)),
                                    Color32::WHITE,
                                );
                            }
                        }
                    }
                }
                Compare::SideBySide => {}
            }
        }
        draw_landmarks(app, &painter, rect, &p);
        if let Some(score) = p.unsure_score() {
            // On the image too: the overlay is what a surgeon watches.
            let galley = painter.layout_no_wrap(
                unsure_text(score),
                egui::FontId::proportional(15.0),
                UNSURE_COLOUR,
            );
            let at = rect.left_top() + Vec2::splat(8.0);
            // On a dark backdrop: frames are often bright where the text goes.
            painter.rect_filled(
                Rect::from_min_size(at, galley.size()).expand(4.0),
                3.0,
                Color32::from_black_alpha(170),
            );
            painter.galley(at, galley, UNSURE_COLOUR);
        }
        if side && let Some((id, _)) = drr {
            let (r2, _) = ui.allocate_exact_size(size, egui::Sense::hover());
            let painter = ui.painter_at(r2);
            painter.image(id, r2, uv, Color32::WHITE);
            draw_landmarks(app, &painter, r2, &p);
        }
    });
}

/// The C-arm geometry of the frames: from the DICOM header where it has one, editable (a
/// recorded source only; the simulated C-arm's is fixed).
fn camera_editor(app: &mut FluoroApp, ui: &mut egui::Ui, p: &super::Processed) {
    let mut c = p.camera;
    ui.heading("C-arm");
    if p.truth.is_some() {
        ui.label(format!(
            "simulated: SDD {:.0} mm, pixel {:.3} x {:.3} mm, {}x{}",
            c.sdd_mm, c.delx_mm, c.dely_mm, c.width_px, c.height_px
        ));
        return;
    }
    let mut changed = false;
    ui.horizontal(|ui| {
        let l = ui.label("SDD mm");
        changed |= ui
            .add(egui::DragValue::new(&mut c.sdd_mm).range(100.0..=3000.0))
            .labelled_by(l.id)
            .changed();
    });
    ui.horizontal(|ui| {
        let l = ui.label("pixel mm (x, y)");
        changed |= ui
            .add(
                egui::DragValue::new(&mut c.delx_mm)
                    .speed(0.001)
                    .range(0.01..=5.0),
            )
            .labelled_by(l.id)
            .changed();
        changed |= ui
            .add(
                egui::DragValue::new(&mut c.dely_mm)
                    .speed(0.001)
                    .range(0.01..=5.0),
            )
            .labelled_by(l.id)
            .changed();
    });
    if changed {
        app.send(super::Command::Camera(c));
    }
}

/// The warning's colour: amber, apart from the landmarks' colours.
const UNSURE_COLOUR: Color32 = Color32::from_rgb(255, 170, 0);

const UNSURE_HOVER: &str = "The landmarks' heatmaps are faint: the frame is unlike what the \
     network learnt from (phantom DRRs), or the pelvis is barely in view. Its landmarks and the \
     pose from them may be wrong; check them against the DRR, or correct them in Annotate.";

/// The Live panel's line for a frame smoothed before the network read it.
fn noise_text(n: &crate::model::noise::InputNoise) -> String {
    format!(
        "noisy frame (noise {:.1}x the training data's highest): smoothed (sigma {:.1} px) before reading",
        n.relative(),
        n.smoothed_px
    )
}

const DOSE_HOVER: &str = "The simulated C-arm's photons per pixel with nothing in the beam, on \
    the training datasets' scale (`dataset --photons`, the same detector blur): the shipped \
    networks learnt 10,000; fluoroscopy runs at a few hundred to a few thousand. 0: clean DRRs.";

const NOISE_HOVER: &str = "The network learnt frames at 10,000 photons per pixel; fluoroscopy's \
    low doses are noisier, and the network reads a smoothed frame better (at 1,000 photons the \
    landmarks' error falls by a quarter, at 300 by a third; model card, 'Low dose'). Landmarks on \
    a frame this noisy are still less accurate. 'smooth noisy frames' under Model turns it off.";

fn unsure_text(score: f64) -> String {
    format!(
        "network unsure of this frame ({:.0}%): landmarks may be wrong",
        100.0 * score
    )
}

fn draw_landmarks(app: &FluoroApp, painter: &egui::Painter, rect: Rect, p: &super::Processed) {
    for (i, d) in p.detections.iter().enumerate() {
        let at = to_screen(rect, p.size, d.point);
        if d.reprojected {
            // Not the network's: no peak of its heatmap agreed with the pose.
            let c = COLOURS[i];
            let ring: Vec<Pos2> = (0..=16)
                .map(|k| {
                    let a = k as f32 / 16.0 * std::f32::consts::TAU;
                    at + 6.0 * Vec2::angled(a)
                })
                .collect();
            painter.extend(egui::Shape::dashed_line(
                &ring,
                Stroke::new(1.5, c),
                3.0,
                2.0,
            ));
            marker_label(painter, at, &format!("{} (pose)", LANDMARKS[i].code), c);
            continue;
        }
        marker(
            painter,
            at,
            i,
            &format!("{} {:.0}%", LANDMARKS[i].code, d.confidence * 100.0),
        );
    }
    // The CT's 3D landmarks reprojected at the shown pose: where the DRR says they are.
    if let Some(pose) = app.display_pose() {
        for (i, l) in app.scene.landmarks.points.iter().enumerate() {
            if let Some(l) = l {
                let uv = p.camera.project(&pose, l);
                cross(painter, to_screen(rect, p.size, uv), COLOURS[i]);
            }
        }
    }
}

pub fn ct(app: &mut FluoroApp, ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        if ui.button("Open NIfTI…").clicked()
            && let Some(p) = rfd::FileDialog::new()
                .add_filter("NIfTI", &["nii", "gz"])
                .pick_file()
        {
            app.load_ct(p);
        }
        if ui.button("Open DICOM folder…").clicked()
            && let Some(p) = rfd::FileDialog::new().pick_folder()
        {
            app.load_ct(p);
        }
        ui.separator();
        for (name, w) in [
            ("bone", (-400.0, 1200.0)),
            ("soft tissue", (-160.0, 240.0)),
            ("lung", (-1350.0, 150.0)),
        ] {
            if ui.button(name).clicked() {
                app.hu_window = w;
            }
        }
        ui.add(egui::DragValue::new(&mut app.hu_window.0).prefix("low "));
        ui.add(egui::DragValue::new(&mut app.hu_window.1).prefix("high "));
        ui.separator();
        if ui.button("Load landmarks…").clicked()
            && let Some(p) = rfd::FileDialog::new().pick_file()
        {
            match crate::landmarks::Landmarks3d::read(&p) {
                Ok(l) => {
                    app.scene.landmarks = l.clone();
                    app.send(super::Command::Landmarks(l));
                }
                Err(e) => app.toast(format!("{}: {e}", p.display()), true),
            }
        }
        if ui.button("Save landmarks…").clicked()
            && let Some(p) = rfd::FileDialog::new()
                .set_file_name("landmarks.mrk.json")
                .save_file()
        {
            match app.scene.landmarks.write(&p) {
                Ok(()) => app.toast(format!("saved {}", p.display()), false),
                Err(e) => app.toast(format!("{}: {e}", p.display()), true),
            }
        }
    });
    let dims = app.scene.volume.dims();
    egui::Panel::right("ct-landmarks")
        .min_size(260.0)
        .show(ui, |ui| {
            ui.heading("3D landmarks (LPS mm)");
            ui.label("select one, then click a slice to place it");
            let mut changed = false;
            for i in 0..N_LANDMARKS {
                ui.horizontal(|ui| {
                    ui.radio_value(
                        &mut app.selected_landmark,
                        i,
                        egui::RichText::new(LANDMARKS[i].code).color(COLOURS[i]),
                    );
                    match app.scene.landmarks.points[i] {
                        Some(p) => {
                            ui.monospace(format!("{:>7.1} {:>7.1} {:>7.1}", p.x, p.y, p.z));
                            if ui.small_button("delete").clicked() {
                                app.scene.landmarks.points[i] = None;
                                changed = true;
                            }
                        }
                        None => {
                            ui.label("—");
                        }
                    }
                });
            }
            if changed {
                app.send(super::Command::Landmarks(app.scene.landmarks.clone()));
            }
        });
    let avail = ui.available_size();
    let labels = ["axial", "coronal", "sagittal"];
    ui.horizontal(|ui| {
        for (view, label) in labels.iter().enumerate() {
            ui.vertical(|ui| {
                let axis = [2, 1, 0][view];
                let mut s = app.slices[axis];
                ui.add(egui::Slider::new(&mut s, 0..=dims[axis].saturating_sub(1)).text(*label));
                app.slices[axis] = s;
                let (img, w, h) = slice_image(app, view);
                let key = (
                    app.slices[axis],
                    (app.hu_window.0 as i32, app.hu_window.1 as i32),
                );
                if app.slice_key[view] != Some(key) || app.slice_tex[view].is_none() {
                    let t = ui.ctx().load_texture(
                        format!("slice{view}"),
                        img,
                        egui::TextureOptions::LINEAR,
                    );
                    app.slice_tex[view] = Some(t);
                    app.slice_key[view] = Some(key);
                }
                let sp = app.scene.volume.spacing_mm();
                let (sw, sh) = match view {
                    0 => (w as f64 * sp[0], h as f64 * sp[1]),
                    1 => (w as f64 * sp[0], h as f64 * sp[2]),
                    _ => (w as f64 * sp[1], h as f64 * sp[2]),
                };
                let size = fit(
                    Vec2::new(avail.x / 3.0 - 10.0, avail.y - 40.0),
                    sw as f32,
                    sh as f32,
                );
                let (rect, resp) = ui.allocate_exact_size(size, egui::Sense::click());
                if let Some(t) = &app.slice_tex[view] {
                    ui.painter_at(rect).image(
                        t.id(),
                        rect,
                        Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
                        Color32::WHITE,
                    );
                }
                let to_ijk = |u: f64, v: f64, slices: [usize; 3]| -> nalgebra::Point3<f64> {
                    match view {
                        0 => nalgebra::Point3::new(u, v, slices[2] as f64),
                        1 => nalgebra::Point3::new(u, slices[1] as f64, (h as f64 - 1.0) - v),
                        _ => nalgebra::Point3::new(slices[0] as f64, u, (h as f64 - 1.0) - v),
                    }
                };
                if resp.clicked()
                    && let Some(pos) = resp.interact_pointer_pos()
                {
                    let uv = from_screen(rect, (w, h), pos);
                    let world = app
                        .scene
                        .volume
                        .voxel_to_world(to_ijk(uv.x, uv.y, app.slices));
                    app.scene.landmarks.points[app.selected_landmark] = Some(world);
                    app.send(super::Command::Landmarks(app.scene.landmarks.clone()));
                }
                // Landmarks near this slice.
                let painter = ui.painter_at(rect);
                for (i, l) in app.scene.landmarks.points.iter().enumerate() {
                    let Some(l) = l else { continue };
                    let v = app.scene.volume.world_to_voxel(*l);
                    let (u, vv, d) = match view {
                        0 => (v.x, v.y, v.z - app.slices[2] as f64),
                        1 => (v.x, (h as f64 - 1.0) - v.z, v.y - app.slices[1] as f64),
                        _ => (v.y, (h as f64 - 1.0) - v.z, v.x - app.slices[0] as f64),
                    };
                    if d.abs() < 3.0 {
                        marker(
                            &painter,
                            to_screen(rect, (w, h), Point2::new(u, vv)),
                            i,
                            LANDMARKS[i].code,
                        );
                    }
                }
            });
        }
    });
}

/// One slice through the current CT, windowed: axial (i, j at k), coronal (i, k at j, superior
/// up), sagittal (j, k at i, superior up).
fn slice_image(app: &FluoroApp, view: usize) -> (egui::ColorImage, usize, usize) {
    let v = &app.scene.volume;
    let [ni, nj, nk] = v.dims();
    let (lo, hi) = app.hu_window;
    let span = (hi - lo).max(1.0);
    let g = |x: f32| (((x - lo) / span).clamp(0.0, 1.0) * 255.0) as u8;
    let s = app.slices;
    let (w, h) = match view {
        0 => (ni, nj),
        1 => (ni, nk),
        _ => (nj, nk),
    };
    let mut bytes = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let (i, j, k) = match view {
                0 => (x, y, s[2].min(nk - 1)),
                1 => (x, s[1].min(nj - 1), nk - 1 - y),
                _ => (s[0].min(ni - 1), x, nk - 1 - y),
            };
            bytes[y * w + x] = g(v.get(i, j, k).unwrap_or(-1000.0));
        }
    }
    (egui::ColorImage::from_gray([w, h], &bytes), w, h)
}

pub fn annotate(app: &mut FluoroApp, ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        if ui.button("Take current frame").clicked()
            && let Some(p) = app.latest.clone()
        {
            app.set_playing(false);
            let mut l = Landmarks2d {
                image: format!("frame_{:05}.png", p.index),
                width: p.size.0 as u32,
                height: p.size.1 as u32,
                ..Default::default()
            };
            for (i, d) in p.detections.iter().enumerate().take(N_LANDMARKS) {
                l.points[i] = Some(d.point);
            }
            app.annotation.current = Some(l);
            app.annotation.undo.clear();
            app.annotation.redo.clear();
            app.annotation.frame = Some(p);
            app.annotation.saved = None;
        }
        if ui.button("Undo").clicked()
            && let Some(prev) = app.annotation.undo.pop()
            && let Some(cur) = app.annotation.current.replace(prev)
        {
            app.annotation.redo.push(cur);
            autosave(app);
        }
        if ui.button("Redo").clicked()
            && let Some(next) = app.annotation.redo.pop()
            && let Some(cur) = app.annotation.current.replace(next)
        {
            app.annotation.undo.push(cur);
            autosave(app);
        }
        if ui.button("Previous").clicked()
            && let Some(p) = &app.latest
        {
            app.send(super::Command::Seek(p.index.saturating_sub(1)));
        }
        if ui.button("Next").clicked()
            && let Some(p) = &app.latest
        {
            app.send(super::Command::Seek(p.index + 1));
        }
        let refined = refined_for_annotation(app);
        if ui
            .add_enabled(refined.is_some(), egui::Button::new("From refined pose"))
            .on_hover_text(
                "set every landmark to where the pose refined against the CT puts it (switch \
                 on \"refine the pose against the CT\" in the Live tab and wait for this frame's \
                 refinement); undo brings the previous ones back",
            )
            .clicked()
            && let Some(points) = refined
            && let Some(cur) = app.annotation.current.as_mut()
        {
            let before = cur.clone();
            cur.points = points;
            app.annotation.undo.push(before);
            app.annotation.redo.clear();
            autosave(app);
        }
        if ui
            .button("Add to dataset")
            .on_hover_text("append this corrected frame to DIR/dataset, which `train` reads")
            .clicked()
        {
            add_to_dataset(app);
        }
        let mut dir = app.settings.annotation_dir.display().to_string();
        let l = ui.label("save to");
        if ui
            .text_edit_singleline(&mut dir)
            .labelled_by(l.id)
            .changed()
        {
            app.settings.annotation_dir = PathBuf::from(dir);
        }
    });
    let (Some(frame), Some(_)) = (
        app.annotation.frame.clone(),
        app.annotation.current.as_ref(),
    ) else {
        ui.label("Take a frame from the live stream to correct its landmarks: drag a marker to move it; right-click marks it not visible. Every change is saved at once (atomically).");
        return;
    };
    egui::Panel::right("annot-list")
        .min_size(240.0)
        .show(ui, |ui| {
            ui.heading("Landmarks (px)");
            let mut toggled = None;
            if let Some(cur) = &app.annotation.current {
                for i in 0..N_LANDMARKS {
                    ui.horizontal(|ui| {
                        ui.colored_label(COLOURS[i], LANDMARKS[i].code);
                        match cur.points[i] {
                            Some(p) => ui.monospace(format!("{:>6.1} {:>6.1}", p.x, p.y)),
                            None => ui.label("not visible"),
                        };
                        if ui.small_button("toggle visible").clicked() {
                            toggled = Some(i);
                        }
                    });
                }
            }
            if let Some(i) = toggled {
                let det = frame.detections.get(i).map(|d| d.point);
                edit(app, |l| {
                    l.points[i] = match l.points[i] {
                        Some(_) => None,
                        None => det.or(Some(Point2::new(
                            l.width as f64 / 2.0,
                            l.height as f64 / 2.0,
                        ))),
                    };
                });
            }
            if let Some(s) = &app.annotation.saved {
                ui.label(format!("saved: {}", s.display()));
            }
        });
    let ctx = ui.ctx().clone();
    let tex = ctx.load_texture(
        "annot-frame",
        super::gray_image(
            &crate::detect::as_read(
                &frame.pixels,
                app.settings.bone.invert_frame(frame.inverted),
            ),
            frame.size.0,
            frame.size.1,
        ),
        egui::TextureOptions::LINEAR,
    );
    let size = fit(
        ui.available_size(),
        frame.size.0 as f32,
        frame.size.1 as f32,
    );
    let (rect, resp) = ui.allocate_exact_size(size, egui::Sense::click_and_drag());
    app.annotation.rect = Some(rect);
    let painter = ui.painter_at(rect);
    painter.image(
        tex.id(),
        rect,
        Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
        Color32::WHITE,
    );
    let pts = app
        .annotation
        .current
        .as_ref()
        .map(|c| c.points)
        .unwrap_or_default();
    for (i, p) in pts.iter().enumerate() {
        if let Some(p) = p {
            marker(
                &painter,
                to_screen(rect, frame.size, *p),
                i,
                LANDMARKS[i].code,
            );
        }
    }
    let nearest = |pos: Pos2| -> Option<usize> {
        pts.iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, to_screen(rect, frame.size, p).distance(pos))))
            .filter(|(_, d)| *d < 15.0)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    };
    if resp.drag_started()
        && let Some(pos) = resp.interact_pointer_pos()
    {
        app.annotation.dragging = nearest(pos);
        if app.annotation.dragging.is_some()
            && let Some(c) = app.annotation.current.clone()
        {
            app.annotation.undo.push(c);
            app.annotation.redo.clear();
        }
    }
    if let (Some(i), Some(pos)) = (app.annotation.dragging, resp.interact_pointer_pos())
        && resp.dragged()
        && let Some(c) = &mut app.annotation.current
    {
        c.points[i] = Some(from_screen(rect, frame.size, pos));
    }
    if resp.drag_stopped() && app.annotation.dragging.take().is_some() {
        autosave(app);
    }
    if resp.secondary_clicked()
        && let Some(pos) = resp.interact_pointer_pos()
        && let Some(i) = nearest(pos)
    {
        edit(app, |l| l.points[i] = None);
    }
}

/// Appends the corrected frame to `annotation_dir/dataset` as a training sample.
fn add_to_dataset(app: &mut FluoroApp) {
    let (Some(frame), Some(cur)) = (&app.annotation.frame, &app.annotation.current) else {
        app.toast("take a frame first", true);
        return;
    };
    let size = crate::model::ModelConfig::default().input_size;
    let dir = app.settings.annotation_dir.join("dataset");
    let pixels = crate::detect::as_read(&frame.pixels, frame.inverted);
    let r = crate::dataset::append_annotated(
        &dir,
        &crate::dataset::Annotated {
            ct: &app.scene.name,
            landmarks3d: &app.scene.landmarks,
            isocenter: app.scene.volume.center_mm(),
            pixels: &pixels,
            size: frame.size,
            camera: &frame.camera,
            points: &cur.points,
            pose: frame.truth,
        },
        size,
    );
    match r {
        Ok(s) => app.toast(format!("added {} to {}", s.image, dir.display()), false),
        Err(e) => app.toast(format!("{}: {e}", dir.display()), true),
    }
}

fn edit(app: &mut FluoroApp, f: impl FnOnce(&mut Landmarks2d)) {
    if let Some(c) = app.annotation.current.clone() {
        app.annotation.undo.push(c);
        app.annotation.redo.clear();
    }
    if let Some(c) = &mut app.annotation.current {
        f(c);
    }
    autosave(app);
}

/// Writes the current annotation (atomically) as `DIR/NAME.json`.
/// The CT's landmarks projected at the refined pose of the frame being annotated (those that
/// fall inside it), when the pipeline has refined that very frame.
fn refined_for_annotation(app: &FluoroApp) -> Option<[Option<nalgebra::Point2<f64>>; N_LANDMARKS]> {
    let frame = app.annotation.frame.as_ref()?;
    let r = app
        .latest
        .as_ref()
        .and_then(|p| p.refined)
        .filter(|r| r.index == frame.index)?;
    Some(app.scene.landmarks.seen_from(&frame.camera, &r.pose))
}

pub fn autosave(app: &mut FluoroApp) {
    let Some(c) = &app.annotation.current else {
        return;
    };
    let dir = app.settings.annotation_dir.clone();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        app.toast(format!("{}: {e}", dir.display()), true);
        return;
    }
    let path = dir.join(format!("{}.json", c.image.trim_end_matches(".png")));
    match c.write_json(&path) {
        Ok(()) => app.annotation.saved = Some(path),
        Err(e) => app.toast(format!("saving {}: {e}", path.display()), true),
    }
}

pub fn train(app: &mut FluoroApp, ui: &mut egui::Ui) {
    use crate::train::Mode;
    let running = app.training.as_ref().is_some_and(|t| {
        !t.task.is_cancelled() && t.task.progress().0 < t.task.progress().1.max(1)
    });
    egui::Grid::new("train-form").num_columns(2).show(ui, |ui| {
        let f = &mut app.train_form;
        let l = ui.label("dataset");
        ui.horizontal(|ui| {
            ui.text_edit_singleline(&mut f.data).labelled_by(l.id);
            if ui.button("…").clicked()
                && let Some(p) = rfd::FileDialog::new().pick_folder()
            {
                f.data = p.display().to_string();
            }
        });
        ui.end_row();
        let mut remove = None;
        for (i, extra) in f.also.iter_mut().enumerate() {
            let l = ui.label("and dataset");
            ui.horizontal(|ui| {
                ui.text_edit_singleline(extra).labelled_by(l.id);
                if ui.button("…").clicked()
                    && let Some(p) = rfd::FileDialog::new().pick_folder()
                {
                    *extra = p.display().to_string();
                }
                if ui
                    .button("remove")
                    .on_hover_text("do not train on it")
                    .clicked()
                {
                    remove = Some(i);
                }
            });
            ui.end_row();
        }
        if let Some(i) = remove {
            f.also.remove(i);
        }
        ui.label("");
        if ui
            .button("+ another dataset")
            .on_hover_text("train on the training images of several datasets together")
            .clicked()
        {
            f.also.push(String::new());
        }
        ui.end_row();
        ui.label("mode");
        ui.horizontal(|ui| {
            ui.selectable_value(&mut f.mode, Mode::Finetune, "finetune (PEL)");
            ui.selectable_value(&mut f.mode, Mode::Baseline, "baseline (BCE)");
            ui.selectable_value(&mut f.mode, Mode::Composite, "composite");
            ui.selectable_value(&mut f.mode, Mode::PelOnly, "PEL only");
        });
        ui.end_row();
        ui.label("start from");
        let live = app
            .models
            .get(app.model_index)
            .map_or_else(|| "none".to_string(), |m| m.0.clone());
        let finetune = f.mode == Mode::Finetune;
        let mut from_live = f.from_live || finetune;
        ui.add_enabled(
            !finetune,
            egui::Checkbox::new(&mut from_live, format!("the Live tab's weights ({live})")),
        )
        .on_hover_text(
            "continue training the network the Live tab runs (train --init); \
             off: a fresh network. Finetune always starts from it.",
        );
        if !finetune {
            f.from_live = from_live;
        }
        ui.end_row();
        let l = ui.label("pose-loss weight λ");
        ui.add_enabled(
            f.mode == Mode::Composite,
            egui::DragValue::new(&mut f.lambda)
                .speed(1e-3)
                .range(0.0..=10.0),
        )
        .labelled_by(l.id)
        .on_hover_text("BCE + λ · pose loss (eq. 9; train --lambda); composite mode");
        ui.end_row();
        let l = ui.label("mirror");
        ui.add_enabled(
            !f.mode.uses_pose(),
            egui::DragValue::new(&mut f.mirror)
                .speed(0.01)
                .range(0.0..=1.0),
        )
        .labelled_by(l.id)
        .on_hover_text(
            "mirror each image left-right with this probability, its landmarks swapped left \
             for right (train --mirror); baseline mode, since a mirror image has no pose of the CT",
        );
        ui.end_row();
        let l = ui.label("epochs");
        ui.add(egui::DragValue::new(&mut f.epochs).range(1..=1000))
            .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("batch");
        ui.add(egui::DragValue::new(&mut f.batch).range(1..=64))
            .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("learning rate");
        ui.add(
            egui::DragValue::new(&mut f.lr)
                .speed(1e-5)
                .range(1e-7..=1.0),
        )
        .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("max steps (0: all)");
        ui.add(egui::DragValue::new(&mut f.max_steps))
            .labelled_by(l.id);
        ui.end_row();
        ui.label("schedule");
        ui.checkbox(&mut f.cosine, "half cosine to lr/100")
            .on_hover_text("decay the learning rate over the run (train --cosine)");
        ui.end_row();
        ui.label("noisy images");
        ui.checkbox(&mut f.denoise, "smooth them as the Live tab does")
            .on_hover_text(
                "prepare each image as the Live tab reads a frame with 'smooth noisy frames' \
                 on (train --denoise): for low-dose data, the network learns the smoothed \
                 images it will be shown",
            );
        ui.end_row();
        ui.label("moving average");
        ui.horizontal(|ui| {
            ui.checkbox(&mut f.ema, "keep one").on_hover_text(
                "also save an exponential moving average of the weights beside them, \
                 NAME.ema.safetensors (train --ema); 0.99 averages about the last 100 steps",
            );
            let l = ui.label("decay");
            ui.add_enabled(
                f.ema,
                egui::DragValue::new(&mut f.ema_decay)
                    .speed(1e-3)
                    .range(0.5..=0.9999),
            )
            .labelled_by(l.id);
        });
        ui.end_row();
        let l = ui.label("save to");
        ui.text_edit_singleline(&mut f.out).labelled_by(l.id);
        ui.end_row();
    });
    ui.horizontal(|ui| {
        if ui
            .add_enabled(!running, egui::Button::new("Start"))
            .clicked()
        {
            start_training(app);
        }
        if ui.add_enabled(running, egui::Button::new("Stop")).clicked()
            && let Some(t) = &app.training
        {
            t.task.cancel();
        }
    });
    if let Some(t) = &app.training {
        let (d, n, m) = t.task.progress();
        ui.add(egui::ProgressBar::new(d as f32 / n.max(1) as f32).text(format!("{d}/{n} {m}")));
        let metrics = t.metrics.lock().map(|m| m.clone()).unwrap_or_default();
        let pts: Vec<[f64; 2]> = metrics.iter().map(|m| [m.step as f64, m.loss]).collect();
        egui_plot::Plot::new("loss")
            .height(ui.available_height().max(100.0))
            .x_axis_label("step")
            .y_axis_label("loss")
            .show(ui, |pu| {
                pu.line(egui_plot::Line::new(
                    "loss",
                    egui_plot::PlotPoints::from(pts),
                ));
            });
    }
}

fn start_training(app: &mut FluoroApp) {
    let f = &app.train_form;
    let folders = std::iter::once(&f.data).chain(f.also.iter().filter(|d| !d.trim().is_empty()));
    let data = match folders
        .map(|d| {
            crate::dataset::Dataset::open(std::path::Path::new(d)).map_err(|e| format!("{d}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(d) => d,
        Err(e) => {
            app.toast(e, true);
            return;
        }
    };
    let from_live = f.from_live || f.mode == crate::train::Mode::Finetune;
    let init = if from_live {
        app.models.get(app.model_index).and_then(|m| match &m.1 {
            super::ModelRef::File(p) => Some(p.clone()),
            // A shipped model as the starting point: write it out once.
            super::ModelRef::Shipped(w) => {
                let p = std::env::temp_dir().join(format!("fluoropose-shipped-{w:?}.safetensors"));
                w.network(&candle_core::Device::Cpu)
                    .ok()
                    .and_then(|n| n.save(&p).ok())
                    .map(|_| p)
            }
        })
    } else {
        None
    };
    if from_live && init.is_none() {
        app.toast(
            "the Live tab's weights could not be written out to train from",
            true,
        );
        return;
    }
    let opts = crate::train::TrainOptions {
        mode: f.mode,
        lambda: f.lambda,
        mirror: if !f.mode.uses_pose() { f.mirror } else { 0.0 },
        epochs: f.epochs,
        batch: f.batch,
        lr: f.lr,
        max_steps: (f.max_steps > 0).then_some(f.max_steps),
        cosine: f.cosine,
        ema: f.ema.then_some(f.ema_decay),
        denoise: f.denoise,
        init,
        out: PathBuf::from(&f.out),
        config: crate::model::ModelConfig {
            // The first folder is always there; `train` checks that the others agree.
            input_size: data
                .first()
                .map_or(crate::model::ModelConfig::default().input_size, |d| {
                    d.manifest.size
                }),
            ..Default::default()
        },
        ..Default::default()
    };
    let task = Task::new();
    let metrics = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let (t2, m2, out) = (task.clone(), metrics.clone(), opts.out.clone());
    std::thread::spawn(move || {
        let r = crate::train::train(&data, &opts, &candle_core::Device::Cpu, &t2, &mut |m| {
            if let Ok(mut v) = m2.lock() {
                v.push(m.clone());
            }
        })
        .map(|_| {
            let mut written = vec![opts.out.clone()];
            if opts.ema.is_some() {
                written.push(crate::train::ema_path(&opts.out));
            }
            written
        })
        .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    app.training = Some(TrainingRun {
        task,
        metrics,
        done: rx,
        out,
    });
}
