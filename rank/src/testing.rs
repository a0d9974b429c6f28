//! Test scaffolding: N ranks as N threads of one process. The communicator lives in
//! [`collectives::thread`] (next to the transports whose semantics it copies); re-exported here
//! so the model's and the programs' tests keep their imports.

pub use collectives::thread::{run_world, ThreadComm};
