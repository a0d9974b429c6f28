//! The SwiGLU MLP.

use anyhow::Result;
use collectives::Communicator;

use crate::model::config::Config;
use crate::model::layers::{ColumnParallelLinear, Prefixed, RowParallelLinear};
use crate::model::plan::ShardPlan;
use crate::model::scratch::{buf, Profiler, Scratch};

/// SwiGLU MLP: gate/up column-parallel (this rank's intermediate slice), down row-parallel.
pub struct Mlp {
    pub(crate) gate_proj: ColumnParallelLinear,
    pub(crate) up_proj: ColumnParallelLinear,
    pub(crate) down_proj: RowParallelLinear,
}

impl Mlp {
    /// `gate_proj`, `up_proj`, `down_proj` under `w` (`model.layers.{i}.mlp`).
    pub fn load(c: &Config, plan: &ShardPlan, mut w: Prefixed) -> Result<Mlp> {
        let (h, inter, cols) = (c.hidden_size, c.intermediate_size, &plan.intermediate);
        Ok(Mlp {
            gate_proj: ColumnParallelLinear::load(
                w.pp("gate_proj"),
                [inter, h],
                cols.clone(),
                false,
            )?,
            up_proj: ColumnParallelLinear::load(w.pp("up_proj"), [inter, h], cols.clone(), false)?,
            down_proj: RowParallelLinear::load(w.pp("down_proj"), [h, inter], cols.clone())?,
        })
    }

    /// SwiGLU MLP of `x` (`[m, hidden]`, normed) into `s.proj`.
    pub(crate) fn forward(
        &self,
        comm: &mut dyn Communicator,
        x: &[f32],
        m: usize,
        sc: &mut Scratch,
        prof: &mut Profiler,
    ) -> Result<()> {
        prof.start();
        let n = m * self.gate_proj.weight.rows();
        let g = buf(&mut sc.gate, n);
        let u = buf(&mut sc.up, n);
        self.gate_proj.forward_into(x, m, g);
        self.up_proj.forward_into(x, m, u);
        kernels::silu_mul(g, u);
        prof.lap(3);
        let proj = buf(&mut sc.proj, m * self.down_proj.weight.rows());
        let g = &sc.gate[..n];
        self.down_proj.forward_into(comm, g, m, proj)?;
        prof.lap(4);
        Ok(())
    }
}
