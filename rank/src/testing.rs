//! Test scaffolding: N ranks as N threads of one process. The communicator lives in
//! [`collectives::thread`] (next to the transports whose semantics it copies); re-exported here
//! so the model's and the programs' tests keep their imports.

pub use collectives::thread::{run_world, ThreadComm};

/// The repository's committed checkpoints (tests/fixtures), each with transformers' references.
pub const FIXTURES: [&str; 4] = [
    "tiny-hub-bf16-tied",
    "tiny-t5-f32-untied",
    "tiny-sharded",
    "qwen25-layout",
];

/// The directory of fixture `name` in the source tree (tests only: an installed binary has none).
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}
