//! fluoropose: real-time pelvic fluoroscopy.
//!
//! A U-Net finds the 8 pelvic landmarks of Mo, Suh et al. ("Enhanced Landmark Detection Model in
//! Pelvic Fluoroscopy using 2D/3D Registration Loss") on each X-ray frame; landmark-based 2D/3D
//! registration (paper eqs. 4-8) recovers the C-arm pose; a DRR of the CT at that pose verifies it.
//!
//! The one flow: `frame source -> model -> landmarks 2D -> registration -> pose -> DRR -> overlay`.
//! Modules are named for the domain and depend only on modules above them in this list:
//! [`io`], [`volume`], [`landmarks`], [`geometry`], [`drr`], [`registration`], then the CLI.
//!
//! Conventions: world = patient LPS millimetres; pixels have their origin at the top-left corner
//! of the top-left pixel (x right, y down); poses are camera_from_world with a Rodrigues rotation
//! vector (radians) and a translation (mm). Units sit in names where they could be doubted
//! (`_mm`, `_px`, `_rad`, `_hu`). See `docs/geometry.md`.

pub mod app;
pub mod bench;
pub mod cli;
pub mod dataset;
pub mod drr;
pub mod eval;
pub mod geometry;
pub mod io;
pub mod landmarks;
pub mod model;
pub mod registration;
pub mod stream;
pub mod task;
pub mod train;
pub mod volume;
