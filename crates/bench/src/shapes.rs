//! The DAGs the benchmarks build: a chain, a wide fan-out and a seeded random layered DAG,
//! as a list of steps (each naming the earlier steps it depends on) that can be written as
//! a Nix expression of trivial derivations or handed to the planner directly.

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The shape of a generated DAG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Shape {
    /// Each step depends on the one before it: no parallelism at all.
    Chain,
    /// One base step, every other step depends on it alone: as wide as it gets.
    Fanout,
    /// Layers of `--width` steps; each depends on one to three random steps of the layer
    /// below (seeded by `--seed`).
    Layered,
}

impl Shape {
    /// The name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Chain => "chain",
            Shape::Fanout => "fanout",
            Shape::Layered => "layered",
        }
    }
}

/// A DAG of `steps.len()` steps; `steps[i]` lists the steps `i` depends on, all `< i`.
/// A root step depending on every step that nothing depends on is implied, so building
/// the root builds every step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dag {
    /// The inputs of each step.
    pub steps: Vec<Vec<usize>>,
}

impl Dag {
    /// A DAG of `nodes` steps of `shape`; `width` and `seed` are used by the layered shape.
    pub fn generate(shape: Shape, nodes: usize, width: usize, seed: u64) -> Dag {
        let steps = match shape {
            Shape::Chain => (0..nodes)
                .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
                .collect(),
            Shape::Fanout => (0..nodes)
                .map(|i| if i == 0 { vec![] } else { vec![0] })
                .collect(),
            Shape::Layered => {
                let width = width.max(1);
                let mut rng = StdRng::seed_from_u64(seed);
                (0..nodes)
                    .map(|i| {
                        let layer_start = i - i % width;
                        if layer_start == 0 {
                            return vec![];
                        }
                        let below = layer_start - width..layer_start;
                        let mut deps: Vec<usize> = (0..rng.gen_range(1..=3))
                            .map(|_| rng.gen_range(below.clone()))
                            .collect();
                        deps.sort_unstable();
                        deps.dedup();
                        deps
                    })
                    .collect()
            }
        };
        Dag { steps }
    }

    /// The steps nothing depends on: the root's inputs.
    pub fn sinks(&self) -> Vec<usize> {
        let mut used = vec![false; self.steps.len()];
        for deps in &self.steps {
            for &d in deps {
                used[d] = true;
            }
        }
        (0..self.steps.len()).filter(|&i| !used[i]).collect()
    }

    /// For each step, the number of steps on the longest path from it to the root
    /// (the root's inputs have depth 1).
    pub fn depths(&self) -> Vec<u64> {
        let mut depth = vec![1u64; self.steps.len()];
        for i in (0..self.steps.len()).rev() {
            for &d in &self.steps[i] {
                depth[d] = depth[d].max(depth[i] + 1);
            }
        }
        depth
    }

    /// A Nix expression building every step as a trivial derivation (`/bin/sh` writing its
    /// name), with `nonce` in every derivation so each benchmark run builds afresh. The
    /// expression evaluates to the root.
    pub fn nix(&self, nonce: &str) -> String {
        let mut text = format!(
            r#"let
  nonce = "{nonce}";
  mk = name: deps: derivation {{
    inherit name nonce deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${{name}} > $out" ];
  }};
"#
        );
        let list = |ids: &[usize]| ids.iter().map(|d| format!(" n{d}")).collect::<String>();
        for (i, deps) in self.steps.iter().enumerate() {
            let _ = writeln!(text, "  n{i} = mk \"n{i}\" [{} ];", list(deps));
        }
        let _ = writeln!(text, "in\nmk \"root\" [{} ]", list(&self.sinks()));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_promised_edges() {
        let chain = Dag::generate(Shape::Chain, 4, 10, 0);
        assert_eq!(chain.steps, vec![vec![], vec![0], vec![1], vec![2]]);
        assert_eq!(chain.sinks(), vec![3]);
        assert_eq!(chain.depths(), vec![4, 3, 2, 1]);

        let fan = Dag::generate(Shape::Fanout, 4, 10, 0);
        assert_eq!(fan.steps, vec![vec![], vec![0], vec![0], vec![0]]);
        assert_eq!(fan.sinks(), vec![1, 2, 3]);
        assert_eq!(fan.depths(), vec![2, 1, 1, 1]);
    }

    #[test]
    fn layered_dags_are_seeded_and_point_one_layer_down() {
        let a = Dag::generate(Shape::Layered, 95, 10, 7);
        assert_eq!(a, Dag::generate(Shape::Layered, 95, 10, 7));
        assert_ne!(a, Dag::generate(Shape::Layered, 95, 10, 8));
        for (i, deps) in a.steps.iter().enumerate() {
            let layer = i / 10;
            assert_eq!(deps.is_empty(), layer == 0, "step {i}: {deps:?}");
            assert!(deps.len() <= 3);
            assert!(
                deps.iter().all(|d| d / 10 + 1 == layer),
                "step {i}: {deps:?}"
            );
        }
        assert!(a.sinks().contains(&94), "the last layer feeds the root");
    }

    #[test]
    fn the_nix_text_names_every_step_and_the_sinks_in_the_root() {
        let text = Dag::generate(Shape::Fanout, 3, 10, 0).nix("abc");
        assert!(text.contains("nonce = \"abc\";"));
        assert!(text.contains("  n0 = mk \"n0\" [ ];\n"));
        assert!(text.contains("  n2 = mk \"n2\" [ n0 ];\n"));
        assert!(text.ends_with("in\nmk \"root\" [ n1 n2 ]\n"));
    }
}
