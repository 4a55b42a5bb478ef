//! The memory accounting against the independent reference (../shared/reference): feeding the
//! reference stack order and block sizes, a plan at every reference `memory_bytes` must give
//! exactly that memory and that many blocks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bitstack_order::{StackEntry, StackLayout};
use proptest::prelude::*;
use serde_json::Value;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn check_reference(model: &str) -> usize {
    let path = shared().join(format!("reference/bitstack_reference_{model}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let json: Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for run in json["bitstack"].as_array().unwrap() {
        let niter = run["niter"].as_u64().unwrap() as usize;
        let sizes = run["per_block_bytes"].as_object().unwrap();
        // The reference lists matrices in module order.
        let names: Vec<&String> = sizes.keys().collect();
        let index = |name: &str| names.iter().position(|n| *n == name).unwrap() as u32;
        let block_bytes: Vec<Vec<u64>> = sizes
            .values()
            .map(|v| vec![v.as_u64().unwrap(); niter])
            .collect();
        let mut order: Vec<StackEntry> = (0..names.len() as u32)
            .map(|m| StackEntry::new(m, 0))
            .collect();
        let mut next = vec![1u32; names.len()];
        for name in run["order"].as_array().unwrap() {
            let m = index(name.as_str().unwrap());
            order.push(StackEntry::new(m, next[m as usize]));
            next[m as usize] += 1;
        }
        // The reference's base_bytes is the base model: fixed tensors + first blocks.
        let base = run["base_bytes"].as_u64().unwrap();
        let fixed = base - block_bytes.iter().map(|b| b[0]).sum::<u64>();
        let layout = StackLayout::new(fixed, block_bytes, order, names.len()).unwrap();
        assert_eq!(layout.min_memory(), base);
        for point in run["curve"].as_array().unwrap() {
            let memory = point["memory_bytes"].as_u64().unwrap();
            let blocks = point["blocks_loaded"].as_u64().unwrap() as usize;
            let plan = layout.plan_for_budget(memory).unwrap();
            assert_eq!(plan.memory_bytes, memory, "{model} k={}", run["k"]);
            assert_eq!(plan.blocks_loaded, blocks, "{model} k={}", run["k"]);
            checked += 1;
        }
        assert_eq!(
            layout.min_memory(),
            run["curve"][0]["memory_bytes"].as_u64().unwrap()
        );
        let below = layout.plan_for_budget(layout.min_memory() - 1).unwrap_err();
        assert!(below.to_string().contains(&layout.min_memory().to_string()));
    }
    checked
}

#[test]
fn reference_curves_small_llama() {
    assert!(check_reference("small-llama") >= 13);
}

#[test]
fn reference_curves_tiny_qwen2() {
    assert!(check_reference("tiny-qwen2") >= 13);
}

#[test]
fn gptq_budget_points() {
    // The reference method evaluated at the GPTQ budgets: budget -> memory actually loaded.
    let path = shared().join("reference/bitstack_reference_small-llama_at_gptq_budgets.json");
    let at: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let path = shared().join("reference/bitstack_reference_small-llama.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let run = json["bitstack"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["k"] == at["k"])
        .unwrap();
    let sizes = run["per_block_bytes"].as_object().unwrap();
    let names: Vec<&String> = sizes.keys().collect();
    let niter = run["niter"].as_u64().unwrap() as usize;
    let block_bytes: Vec<Vec<u64>> = sizes
        .values()
        .map(|v| vec![v.as_u64().unwrap(); niter])
        .collect();
    let mut order: Vec<StackEntry> = (0..names.len() as u32)
        .map(|m| StackEntry::new(m, 0))
        .collect();
    let mut next = vec![1u32; names.len()];
    for name in run["order"].as_array().unwrap() {
        let m = names
            .iter()
            .position(|n| *n == name.as_str().unwrap())
            .unwrap();
        order.push(StackEntry::new(m as u32, next[m]));
        next[m] += 1;
    }
    let fixed = run["base_bytes"].as_u64().unwrap() - block_bytes.iter().map(|b| b[0]).sum::<u64>();
    let layout = StackLayout::new(fixed, block_bytes, order, names.len()).unwrap();
    for p in at["points"].as_array().unwrap() {
        let plan = layout
            .plan_for_budget(p["budget_bytes"].as_u64().unwrap())
            .unwrap();
        assert_eq!(plan.memory_bytes, p["memory_bytes"].as_u64().unwrap());
        assert_eq!(plan.blocks_loaded as u64, p["blocks"].as_u64().unwrap());
    }
}

proptest! {
    /// The plan is the longest prefix that fits: it fits, and one more block would not.
    #[test]
    fn plan_is_longest_fitting_prefix(
        sizes in proptest::collection::vec(proptest::collection::vec(1u64..10_000, 1..6), 1..8),
        base in 0u64..100_000,
        extra in 0u64..200_000,
        seed in any::<u64>(),
    ) {
        // A random chain-respecting order: repeatedly pick a matrix with blocks left.
        let mut next = vec![0u32; sizes.len()];
        let mut order: Vec<StackEntry> = (0..sizes.len() as u32).map(|m| { next[m as usize] = 1; StackEntry::new(m, 0) }).collect();
        let mut state = seed | 1;
        loop {
            let open: Vec<usize> = (0..sizes.len()).filter(|&m| (next[m] as usize) < sizes[m].len()).collect();
            if open.is_empty() { break; }
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            let m = open[(state % open.len() as u64) as usize];
            order.push(StackEntry::new(m as u32, next[m]));
            next[m] += 1;
        }
        let layout = StackLayout::new(base, sizes.clone(), order.clone(), sizes.len()).unwrap();
        let budget = layout.min_memory() + extra;
        let plan = layout.plan_for_budget(budget).unwrap();
        prop_assert!(plan.memory_bytes <= budget);
        let naive: u64 = base + order[..plan.blocks_loaded].iter().map(|e| sizes[e.matrix as usize][e.block as usize]).sum::<u64>();
        prop_assert_eq!(naive, plan.memory_bytes);
        if plan.blocks_loaded < order.len() {
            prop_assert!(layout.memory_of_prefix(plan.blocks_loaded + 1) > budget);
        }
        prop_assert_eq!(plan.per_matrix.iter().map(|&c| c as usize).sum::<usize>(), plan.blocks_loaded);
    }
}
