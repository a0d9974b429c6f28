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
//! | (srun's PMIx/PMI) | Slurm's columns, when SLURM_PROCID names the same task (see `pmi` below) | | | | |
//! | Slurm | SLURM_PROCID | SLURM_STEP_NUM_TASKS, else SLURM_NTASKS | SLURM_LOCALID | this node's entry of SLURM_STEP_TASKS_PER_NODE, else SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_TASKS_PER_NODE | SLURM_NODEID |
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

/// This node's task count from Slurm's compressed list `var`=`list`, e.g. `4(x2),3` with node 2
/// -> 3.
fn slurm_tasks_on(var: &str, list: &str, node: usize) -> Result<usize, String> {
    let bad = || format!("{var}={list} is not a list like 4(x2),3");
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
    Err(format!("{var}={list} has no entry for SLURM_NODEID={node}"))
}

/// Slurm's task variables. Inside a step (srun) the step's own counts win over the job's: srun
/// under an `sbatch -n 8` that runs `srun -n 4` sees the job's SLURM_TASKS_PER_NODE, but its
/// tasks are laid out as SLURM_STEP_TASKS_PER_NODE says.
fn slurm(get: Get) -> Result<Identity, String> {
    let with = "SLURM_PROCID";
    let node = num(get, "SLURM_NODEID")?;
    let list = |var: &str| -> Result<Option<usize>, String> {
        get(var)
            .map(|l| slurm_tasks_on(var, &l, node.unwrap_or(0)))
            .transpose()
    };
    let local_world = match list("SLURM_STEP_TASKS_PER_NODE")? {
        Some(n) => Some(n),
        None => match num(get, "SLURM_NTASKS_PER_NODE")? {
            Some(n) => Some(n),
            None => list("SLURM_TASKS_PER_NODE")?,
        },
    };
    let world = match num(get, "SLURM_STEP_NUM_TASKS")? {
        Some(n) => n,
        None => need(get, "SLURM_NTASKS", with)?,
    };
    Ok(Identity {
        source: Source::Slurm,
        rank: need(get, "SLURM_PROCID", with)?,
        world,
        local_rank: num(get, "SLURM_LOCALID")?,
        local_world,
        node,
    })
}

/// PMIx/PMI's rank (`var`). srun sets these beside its own variables (`--mpi=pmix`: PMIX_RANK
/// and PMIX_NAMESPACE=slurm.pmix.JOB.STEP but no size; `--mpi=pmi2`: PMI_RANK and PMI_SIZE), so
/// when Slurm describes the same task (same rank, same size where PMI gives one, and for PMIx a
/// namespace srun made) Slurm's identity is taken, with its local rank, node and ranks per node.
/// Otherwise PMI is a launcher of its own inside the Slurm job and needs PMI_SIZE.
fn pmi(get: Get, var: &str) -> Result<Identity, String> {
    let rank = need(get, var, var)?;
    let size = num(get, "PMI_SIZE")?;
    let srun_made =
        var != "PMIX_RANK" || get("PMIX_NAMESPACE").is_none_or(|ns| ns.starts_with("slurm.pmix."));
    if get("SLURM_PROCID").is_some() && srun_made {
        let s = slurm(get)?;
        if s.rank == rank && size.is_none_or(|n| n == s.world) {
            return Ok(s);
        }
    }
    let world = size.ok_or_else(|| {
        let slurm = match get("SLURM_PROCID") {
            Some(p) => format!(", and Slurm's SLURM_PROCID={p} is another task"),
            None => ", nor are Slurm's SLURM_PROCID and SLURM_NTASKS".to_string(),
        };
        format!("{var} is set but PMI_SIZE is not{slurm}: start the ranks with srun, mpirun or a launcher that sets PMI_SIZE")
    })?;
    Ok(Identity {
        source: Source::Pmi,
        rank,
        world,
        local_rank: None,
        local_world: None,
        node: None,
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
        pmi(get, var)?
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
        assert_eq!(slurm_tasks_on("SLURM_TASKS_PER_NODE", "4(x2),3", 2), Ok(3));
        assert_eq!(slurm_tasks_on("SLURM_TASKS_PER_NODE", "4(x2),3", 1), Ok(4));
        assert!(slurm_tasks_on("SLURM_TASKS_PER_NODE", "4(x2),3", 3)
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

    /// Task 3 of `srun -N2 -n4` (Slurm 22.05), as the task sees it; `extra` adds the PMI layer.
    fn srun_task3(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_NPROCS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_NNODES", "2"),
            ("SLURM_JOB_ID", "7"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_TASKS_PER_NODE", "2(x2)"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x2)"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURMD_NODENAME", "n2"),
        ];
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn srun_with_pmix_is_slurm_with_its_nodes() {
        // `srun --mpi=pmix`: PMIX_RANK and the namespace, no PMI_SIZE (the reported failure).
        let pmix = srun_task3(&[
            ("PMIX_RANK", "3"),
            ("PMIX_NAMESPACE", "slurm.pmix.7.0"),
            (
                "PMIX_SERVER_URI41",
                "pmix-server.1234;tcp4://127.0.0.1:40000",
            ),
            ("PMIX_SERVER_TMPDIR", "/var/spool/slurmd/n2/pmix.7.0/"),
        ]);
        // `srun --mpi=pmi2`: PMI_RANK and PMI_SIZE over PMI_FD.
        let pmi2 = srun_task3(&[
            ("PMI_FD", "5"),
            ("PMI_JOBID", "7.0"),
            ("PMI_RANK", "3"),
            ("PMI_SIZE", "4"),
        ]);
        for (name, vars) in [("pmix", pmix), ("pmi2", pmi2), ("none", srun_task3(&[]))] {
            let id = look(&vars)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .unwrap();
            assert_eq!(id.source, Source::Slurm, "{name}");
            assert_eq!(
                (id.rank, id.world, id.local_rank, id.local_world, id.node),
                (3, 4, Some(1), Some(2), Some(1)),
                "{name}"
            );
        }
    }

    #[test]
    fn a_step_inside_a_bigger_job_takes_the_steps_layout() {
        // `sbatch -N2 -n8` running `srun -n4 --ntasks-per-node 2`: the job's list says 4 per node.
        let mut v = srun_task3(&[("SLURM_NTASKS_PER_NODE", "4")]);
        v.retain(|(k, _)| *k != "SLURM_TASKS_PER_NODE");
        v.push(("SLURM_TASKS_PER_NODE", "4(x2)"));
        let id = look(&v).unwrap().unwrap();
        assert_eq!((id.world, id.local_world), (4, Some(2)));
        let e = look(&srun_task3(&[("SLURM_STEP_TASKS_PER_NODE", "2(")])).unwrap_err();
        assert!(e.contains("SLURM_STEP_TASKS_PER_NODE=2("), "{e}");
    }

    #[test]
    fn pmi_of_another_launcher_inside_slurm_is_not_taken_for_srun() {
        // A PMIx launcher (its own namespace) started from a Slurm job: PMI's numbers, and
        // without PMI_SIZE one line naming what is missing.
        let other = srun_task3(&[
            ("PMIX_RANK", "3"),
            ("PMIX_NAMESPACE", "prterun-host-1234@1"),
            ("PMI_SIZE", "6"),
        ]);
        let id = look(&other).unwrap().unwrap();
        assert_eq!((id.source, id.rank, id.world), (Source::Pmi, 3, 6));
        assert_eq!(id.local_world, None);
        let e = look(&srun_task3(&[("PMI_RANK", "2")])).unwrap_err();
        assert!(
            e.contains("PMI_RANK is set but PMI_SIZE is not") && e.contains("SLURM_PROCID=3"),
            "{e}"
        );
        let e = look(&[("PMIX_RANK", "0")]).unwrap_err();
        assert!(e.contains("PMI_SIZE") && e.contains("SLURM_NTASKS"), "{e}");
        // srun's PMIx with a bad Slurm value is an error naming it, not a silent fallback.
        let mut bad = srun_task3(&[("PMIX_RANK", "3"), ("PMIX_NAMESPACE", "slurm.pmix.7.0")]);
        bad.retain(|(k, _)| *k != "SLURM_LOCALID");
        bad.push(("SLURM_LOCALID", "one"));
        let e = look(&bad).unwrap_err();
        assert!(e.contains("SLURM_LOCALID=one"), "{e}");
    }
}
