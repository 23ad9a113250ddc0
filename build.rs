//! Embeds the shipped model when `models/default.safetensors` exists (see `src/model/shipped.rs`).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_default_model)");
    println!("cargo::rerun-if-changed=models/default.safetensors");
    println!("cargo::rerun-if-changed=models/default.json");
    if std::path::Path::new("models/default.safetensors").exists()
        && std::path::Path::new("models/default.json").exists()
    {
        println!("cargo::rustc-cfg=has_default_model");
    }
}
