//! Who this rank is, from the launcher that started the process: tprun, torchrun, Open MPI,
//! PMIx/PMI or Slurm. The sources are read in that fixed order and the first whose rank variable
//! is set wins, so a rank of `tprun -n 4` under `srun` still takes tprun's numbering (the closest
//! launcher), and a bad value in the winning source is an error naming the variable.
//!
//! | source | rank | world | local rank | local world | node |
//! | --- | --- | --- | --- | --- | --- |
//! | tprun / torchrun | RANK | WORLD_SIZE | LOCAL_RANK | LOCAL_WORLD_SIZE | GROUP_RANK |
//! | Open MPI | OMPI_COMM_WORLD_RANK | _SIZE | _LOCAL_RANK | _LOCAL_SIZE | OMPI_COMM_WORLD_NODE_RANK is not a node id, so none |
//! | PMIx / PMI | PMIX_RANK, PMI_RANK | PMI_SIZE | - | - | - |
//! | Slurm | SLURM_PROCID | SLURM_NTASKS | SLURM_LOCALID | SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_TASKS_PER_NODE | SLURM_NODEID |
//!
//! (tprun's own ranks get the torchrun variables plus TPRUN_SHM_FD, so "tprun's" and
//! "torchrun's" are the same variables.)

/// Where a rank's identity came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// RANK / WORLD_SIZE (tprun's ranks and torchrun's).
    Torchrun,
    /// OMPI_COMM_WORLD_* (`mpirun` of Open MPI).
    OpenMpi,
    /// PMIX_RANK or PMI_RANK with PMI_SIZE (MPICH, Intel MPI, PMIx launchers).
    Pmi,
    /// SLURM_PROCID / SLURM_NTASKS (`srun`).
    Slurm,
}

impl Source {
    /// The source with the variables it reads, for messages that say where a number came from.
    pub fn name(self) -> &'static str {
        match self {
            Source::Torchrun => "torchrun (RANK, WORLD_SIZE)",
            Source::OpenMpi => "Open MPI (OMPI_COMM_WORLD_*)",
            Source::Pmi => "PMIx/PMI (PMIX_RANK/PMI_RANK, PMI_SIZE)",
            Source::Slurm => "Slurm (SLURM_PROCID, SLURM_NTASKS)",
        }
    }
}

/// This rank's place in the job. `local_*` and `node` are `None` where the launcher does not say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The launcher whose variables were read.
    pub source: Source,
    /// Global rank, 0..world.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// Rank on this host.
    pub local_rank: Option<usize>,
    /// Ranks on this host.
    pub local_world: Option<usize>,
    /// This host's number in the job.
    pub node: Option<usize>,
}

type Get<'a> = &'a dyn Fn(&str) -> Option<String>;

fn num(get: Get, var: &str) -> Result<Option<usize>, String> {
    match get(var) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{var}={v} is not a whole number")),
    }
}

fn need(get: Get, var: &str, with: &str) -> Result<usize, String> {
    num(get, var)?.ok_or_else(|| format!("{with} is set but {var} is not"))
}

/// This node's task count from Slurm's compressed list, e.g. `4(x2),3` with node 2 -> 3.
fn slurm_tasks_on(list: &str, node: usize) -> Result<usize, String> {
    let bad = || format!("SLURM_TASKS_PER_NODE={list} is not a list like 4(x2),3");
    let mut seen = 0;
    for item in list.split(',') {
        let (count, times) = match item.split_once("(x") {
            Some((c, t)) => (c, t.strip_suffix(')').ok_or_else(bad)?),
            None => (item, "1"),
        };
        let count: usize = count.trim().parse().map_err(|_| bad())?;
        let times: usize = times.trim().parse().map_err(|_| bad())?;
        seen += times;
        if node < seen {
            return Ok(count);
        }
    }
    Err(format!(
        "SLURM_TASKS_PER_NODE={list} has no entry for SLURM_NODEID={node}"
    ))
}

fn slurm(get: Get) -> Result<Identity, String> {
    let with = "SLURM_PROCID";
    let node = num(get, "SLURM_NODEID")?;
    let local_world = match (
        num(get, "SLURM_NTASKS_PER_NODE")?,
        get("SLURM_TASKS_PER_NODE"),
    ) {
        (Some(n), _) => Some(n),
        (None, Some(list)) => Some(slurm_tasks_on(&list, node.unwrap_or(0))?),
        (None, None) => None,
    };
    Ok(Identity {
        source: Source::Slurm,
        rank: need(get, "SLURM_PROCID", with)?,
        world: need(get, "SLURM_NTASKS", with)?,
        local_rank: num(get, "SLURM_LOCALID")?,
        local_world,
        node,
    })
}

/// The identity from the first source present (see the module docs), `None` when no launcher
/// variable is set; `get` reads a variable (the process environment in [`from_env`]).
pub fn from_lookup(get: Get) -> Result<Option<Identity>, String> {
    let id = |source, rank, world, local_rank, local_world, node| Identity {
        source,
        rank,
        world,
        local_rank,
        local_world,
        node,
    };
    let id = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
        let w = "WORLD_SIZE";
        id(
            Source::Torchrun,
            need(get, "RANK", w)?,
            need(get, w, "RANK")?,
            num(get, "LOCAL_RANK")?,
            num(get, "LOCAL_WORLD_SIZE")?,
            num(get, "GROUP_RANK")?,
        )
    } else if get("OMPI_COMM_WORLD_RANK").is_some() {
        let with = "OMPI_COMM_WORLD_RANK";
        id(
            Source::OpenMpi,
            need(get, with, with)?,
            need(get, "OMPI_COMM_WORLD_SIZE", with)?,
            num(get, "OMPI_COMM_WORLD_LOCAL_RANK")?,
            num(get, "OMPI_COMM_WORLD_LOCAL_SIZE")?,
            None,
        )
    } else if let Some(var) = ["PMIX_RANK", "PMI_RANK"]
        .into_iter()
        .find(|v| get(v).is_some())
    {
        id(
            Source::Pmi,
            need(get, var, var)?,
            need(get, "PMI_SIZE", var)?,
            None,
            None,
            None,
        )
    } else if get("SLURM_PROCID").is_some() {
        slurm(get)?
    } else {
        return Ok(None);
    };
    id.check().map(Some)
}

impl Identity {
    fn check(self) -> Result<Identity, String> {
        let src = self.source.name();
        if self.world == 0 || self.rank >= self.world {
            return Err(format!(
                "{src}: rank {} is out of range for world size {}",
                self.rank, self.world
            ));
        }
        if let Some(lw) = self.local_world {
            if lw == 0 || lw > self.world || self.local_rank.is_some_and(|lr| lr >= lw) {
                return Err(format!(
                    "{src}: local rank {:?} of {lw} on this node does not fit world size {}",
                    self.local_rank, self.world
                ));
            }
        }
        Ok(self)
    }
}

/// The identity from this process's environment (see [`from_lookup`]).
pub fn from_env() -> Result<Option<Identity>, String> {
    from_lookup(&|v| std::env::var(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn look(vars: &[(&str, &str)]) -> Result<Option<Identity>, String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_lookup(&move |v| m.get(v).cloned())
    }

    #[test]
    fn srun_variables_are_read() {
        let srun = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
        ];
        let id = look(&srun).unwrap().unwrap();
        assert_eq!(id.source, Source::Slurm);
        assert_eq!(
            (id.rank, id.world, id.local_rank, id.local_world, id.node),
            (5, 8, Some(1), Some(4), Some(1))
        );
        // Uneven nodes: node 2 of "4(x2),3" runs 3 tasks; SLURM_NTASKS_PER_NODE wins when set.
        assert_eq!(slurm_tasks_on("4(x2),3", 2), Ok(3));
        assert_eq!(slurm_tasks_on("4(x2),3", 1), Ok(4));
        assert!(slurm_tasks_on("4(x2),3", 3)
            .unwrap_err()
            .contains("no entry"));
        let mut v = srun.to_vec();
        v.push(("SLURM_NTASKS_PER_NODE", "2"));
        assert_eq!(look(&v).unwrap().unwrap().local_world, Some(2));
    }

    #[test]
    fn the_order_is_tprun_torchrun_then_ompi_then_pmi_then_slurm() {
        let all = [
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("PMI_RANK", "2"),
            ("PMI_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
        ];
        for (skip, want) in [(0, (Source::Torchrun, 0)), (2, (Source::OpenMpi, 1))] {
            let id = look(&all[..all.len() - skip]).unwrap().unwrap();
            assert_eq!((id.source, id.rank), want);
        }
        let id = look(&all[..4]).unwrap().unwrap();
        assert_eq!((id.source, id.rank), (Source::Pmi, 2));
        assert_eq!(look(&all[..2]).unwrap().unwrap().source, Source::Slurm);
        assert_eq!(look(&[]).unwrap(), None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = look(&[("OMPI_COMM_WORLD_RANK", "1")]).unwrap_err();
        assert!(e.contains("OMPI_COMM_WORLD_SIZE"), "{e}");
        let e = look(&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "2")]).unwrap_err();
        assert!(e.contains("SLURM_PROCID=x"), "{e}");
        let e = look(&[("PMI_RANK", "4"), ("PMI_SIZE", "4")]).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = look(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_TASKS_PER_NODE", "2(x"),
        ])
        .unwrap_err();
        assert!(e.contains("SLURM_TASKS_PER_NODE"), "{e}");
    }
}
