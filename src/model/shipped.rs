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
