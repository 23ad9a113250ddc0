//! The shipped models, embedded in the binary so that the app and the CLI run with no files
//! beside them: the default network (`models/default.safetensors` + `.json`, 12..192 channels)
//! and a compact one (`models/compact.*`, 8..128 channels, the previous default) that keeps a
//! live stream at its frame rate on a 2-core CPU. Their model card is `models/README.md`.

use super::{ModelConfig, ModelError, Predictor, UNet, Views};
use candle_core::Device;

#[cfg(has_default_model)]
const DEFAULT: Option<(&[u8], &str)> = Some((
    include_bytes!("../../models/default.safetensors"),
    include_str!("../../models/default.json"),
));
#[cfg(not(has_default_model))]
const DEFAULT: Option<(&[u8], &str)> = None;
#[cfg(has_compact_model)]
const COMPACT: Option<(&[u8], &str)> = Some((
    include_bytes!("../../models/compact.safetensors"),
    include_str!("../../models/compact.json"),
));
#[cfg(not(has_compact_model))]
const COMPACT: Option<(&[u8], &str)> = None;

/// One of the embedded networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Shipped {
    /// `models/default`: the most accurate (model card, "Step 7").
    Default,
    /// `models/compact`: 2.25 times less arithmetic per frame, for a live stream on a CPU with
    /// few cores (model card, "Step 6").
    Compact,
}

impl Shipped {
    /// Both, the default first.
    pub const ALL: [Shipped; 2] = [Shipped::Default, Shipped::Compact];

    /// The file it was embedded from.
    pub fn file(self) -> &'static str {
        match self {
            Shipped::Default => "models/default.safetensors",
            Shipped::Compact => "models/compact.safetensors",
        }
    }

    /// For the model picker and reports.
    pub fn label(self) -> &'static str {
        match self {
            Shipped::Default => "shipped (models/default)",
            Shipped::Compact => "shipped, compact (models/compact)",
        }
    }

    /// The network a live stream starts with when the model runs on `device`: the default
    /// where the moved views fit a live stream too (a GPU, or 4+ CPU threads), the compact one
    /// on fewer CPU threads, where the default takes the Live tab from 9 to 7 fps (model card,
    /// "Step 7 against step 6"). Headless commands (`eval`, `predict`) use the default.
    pub fn for_live(device: &Device) -> Self {
        if Views::shifts_fit_live(device) || !Shipped::Compact.available() {
            Shipped::Default
        } else {
            Shipped::Compact
        }
    }

    fn embedded(self) -> Option<(&'static [u8], &'static str)> {
        match self {
            Shipped::Default => DEFAULT,
            Shipped::Compact => COMPACT,
        }
    }

    /// Whether this build carries it.
    pub fn available(self) -> bool {
        self.embedded().is_some()
    }

    fn missing(self) -> ModelError {
        ModelError::Config(format!(
            "this build has no {} ({} was absent)",
            self.label(),
            self.file()
        ))
    }

    /// Its configuration (architecture, input size, card), without the weights.
    pub fn config(self) -> Result<ModelConfig, ModelError> {
        let (_, c) = self.embedded().ok_or_else(|| self.missing())?;
        parse(c, self)
    }

    /// The network.
    pub fn network(self, device: &Device) -> Result<UNet, ModelError> {
        let (w, c) = self.embedded().ok_or_else(|| self.missing())?;
        UNet::from_bytes(
            w,
            parse(c, self)?,
            device,
            std::path::Path::new(self.file()),
        )
    }

    /// The network ready for inference.
    pub fn predictor(self, device: &Device) -> Result<Predictor, ModelError> {
        Predictor::new(&self.network(device)?)
    }
}

fn parse(c: &str, which: Shipped) -> Result<ModelConfig, ModelError> {
    serde_json::from_str(c).map_err(|source| ModelError::Json {
        path: std::path::Path::new(which.file()).with_extension("json"),
        source,
    })
}

/// Whether this build carries the default shipped model.
pub fn available() -> bool {
    Shipped::Default.available()
}

/// The default shipped network's configuration.
pub fn config() -> Result<ModelConfig, ModelError> {
    Shipped::Default.config()
}

/// The default shipped network.
pub fn network(device: &Device) -> Result<UNet, ModelError> {
    Shipped::Default.network(device)
}

/// The default shipped model ready for inference.
pub fn predictor(device: &Device) -> Result<Predictor, ModelError> {
    Shipped::Default.predictor(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    /// The fast inference path (batch norm folded, fused pool/upsample/concat convolutions)
    /// gives each shipped model's outputs to 1e-4 of the plain network's.
    #[test]
    fn shipped_models_fused_outputs_match_the_plain_network() {
        for which in Shipped::ALL.into_iter().filter(|w| w.available()) {
            fused_matches_plain(which);
        }
    }

    fn fused_matches_plain(which: Shipped) {
        let dev = Device::Cpu;
        let net = which.network(&dev).unwrap();
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
        assert!(diff / scale < 1e-4, "{which:?}: {diff} of {scale}");
    }

    /// The two embedded networks are the architectures their cards say, and differ.
    #[test]
    fn both_shipped_networks_load() {
        if !(Shipped::Default.available() && Shipped::Compact.available()) {
            return;
        }
        let wide = Shipped::Default.config().unwrap();
        let compact = Shipped::Compact.config().unwrap();
        assert!(wide.base_channels > compact.base_channels);
        for which in Shipped::ALL {
            let net = which.network(&Device::Cpu).unwrap();
            assert_eq!(
                net.config.base_channels,
                which.config().unwrap().base_channels
            );
        }
        // On this CPU-only test the live default follows the thread count.
        let live = Shipped::for_live(&Device::Cpu);
        assert_eq!(
            live == Shipped::Default,
            Views::shifts_fit_live(&Device::Cpu)
        );
    }
}
