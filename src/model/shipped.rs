//! The shipped default model (`models/default.safetensors` + `models/default.json`), embedded in
//! the binary so that the app and the CLI run with no files beside them.

use super::{ModelConfig, ModelError, Predictor, UNet};
use candle_core::Device;

#[cfg(has_default_model)]
const WEIGHTS: Option<&[u8]> = Some(include_bytes!("../../models/default.safetensors"));
#[cfg(has_default_model)]
const CONFIG: Option<&str> = Some(include_str!("../../models/default.json"));
#[cfg(not(has_default_model))]
const WEIGHTS: Option<&[u8]> = None;
#[cfg(not(has_default_model))]
const CONFIG: Option<&str> = None;

/// Whether this build carries the shipped model.
pub fn available() -> bool {
    WEIGHTS.is_some()
}

/// The shipped network.
pub fn network(device: &Device) -> Result<UNet, ModelError> {
    let (Some(w), Some(c)) = (WEIGHTS, CONFIG) else {
        return Err(ModelError::Config(
            "this build has no shipped model (models/default.safetensors was absent)".into(),
        ));
    };
    let config: ModelConfig = serde_json::from_str(c).map_err(|source| ModelError::Json {
        path: "models/default.json".into(),
        source,
    })?;
    UNet::from_bytes(
        w,
        config,
        device,
        std::path::Path::new("models/default.safetensors"),
    )
}

/// The shipped model ready for inference.
pub fn predictor(device: &Device) -> Result<Predictor, ModelError> {
    Predictor::new(&network(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    /// The fast inference path (batch norm folded, fused pool/upsample/concat convolutions)
    /// gives the shipped model's outputs to 1e-4 of the plain network's.
    #[test]
    fn shipped_model_fused_outputs_match_the_plain_network() {
        if !available() {
            return;
        }
        let dev = Device::Cpu;
        let net = network(&dev).unwrap();
        let s = net.config.input_size;
        let (vol, _) = crate::volume::phantom::phantom_subject(31, Some(3.0));
        let d = crate::drr::DensityVolume::from_volume(&vol, crate::drr::Attenuation::default());
        let cam = crate::geometry::Camera::paper(s as u32);
        let pose = crate::geometry::sampling::ap_pose(&vol.center_mm(), 800.0);
        let img = crate::drr::cpu::render(
            &d,
            &cam,
            &pose,
            crate::drr::cpu::Renderer::Siddon { full_line: false },
        );
        let x = Tensor::from_vec(net.config.normalisation.apply(&img), (1, 1, s, s), &dev).unwrap();
        let plain = net.forward(&x, false).unwrap();
        let fused = net.fused().unwrap().forward(&x, false).unwrap();
        let scale = plain
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (plain - fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff / scale < 1e-4, "{diff} of {scale}");
    }
}
