//! Every WGSL shader parses and validates with naga (the compiler wgpu uses), and the uniform
//! structs the shaders declare have exactly the size of their Rust twins.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

use eframe::wgpu::naga;
use fluoropose::drr::gpu::{DrrUniforms, GpuPose, WindowUniforms, shader_sources};

fn module(name: &str, src: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    (module, info)
}

fn struct_size(m: &naga::Module, name: &str) -> u32 {
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(m.to_ctx()).unwrap();
    let (h, _) = m
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no struct {name}"));
    layouter[h].size
}

#[test]
fn all_shaders_validate() {
    let sources = shader_sources();
    assert_eq!(sources.len(), 3);
    for (name, src) in &sources {
        let (m, _) = module(name, src);
        assert!(
            m.entry_points
                .iter()
                .any(|e| e.name == "main" && e.stage == naga::ShaderStage::Compute),
            "{name} has no compute main"
        );
    }
    // Every .wgsl file in shaders/ is used by one of the pipelines.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for f in std::fs::read_dir(dir).unwrap() {
        let name = f
            .unwrap()
            .file_name()
            .to_string_lossy()
            .replace(".wgsl", "");
        assert!(
            name == "drr_common" || sources.iter().any(|(n, _)| *n == name),
            "shaders/{name}.wgsl is not compiled anywhere"
        );
    }
}

#[test]
fn uniform_layouts_match_rust() {
    let sources = shader_sources();
    let (siddon, _) = module(sources[0].0, &sources[0].1);
    assert_eq!(
        struct_size(&siddon, "DrrUniforms") as usize,
        std::mem::size_of::<DrrUniforms>()
    );
    assert_eq!(
        struct_size(&siddon, "GpuPose") as usize,
        std::mem::size_of::<GpuPose>()
    );
    let (window, _) = module(sources[2].0, &sources[2].1);
    assert_eq!(
        struct_size(&window, "WindowUniforms") as usize,
        std::mem::size_of::<WindowUniforms>()
    );
}

#[test]
fn a_broken_shader_is_caught() {
    // The validation above can fail: a type error is reported, not accepted.
    let original = shader_sources()[0].1.clone();
    let src = original.replace("let end = min(next, amax);", "let end = min(next, ix);"); // f32 vs i32
    assert_ne!(src, original, "the mutation must apply");
    assert!(
        naga::front::wgsl::parse_str(&src).is_err() || {
            let m = naga::front::wgsl::parse_str(&src).unwrap();
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::default(),
            )
            .validate(&m)
            .is_err()
        }
    );
}
