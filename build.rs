//! Embeds the shipped models whose files exist (see `src/model/shipped.rs`).
fn main() {
    for (name, cfg) in [
        ("default", "has_default_model"),
        ("compact", "has_compact_model"),
    ] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        let (w, j) = (
            format!("models/{name}.safetensors"),
            format!("models/{name}.json"),
        );
        println!("cargo::rerun-if-changed={w}");
        println!("cargo::rerun-if-changed={j}");
        if std::path::Path::new(&w).exists() && std::path::Path::new(&j).exists() {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
