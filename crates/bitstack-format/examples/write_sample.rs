//! Writes a small sample container (used to seed the fuzz corpus).
//!
//! `cargo run -p bitstack-format --example write_sample -- out.bitstack`

use std::collections::BTreeMap;

use bitstack_format::{Container, ContainerWriter, Dtype, PartData};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: write_sample <output path>")?;
    let mut writer = ContainerWriter::new(BTreeMap::from([(
        "architecture".to_owned(),
        serde_json::json!("LlamaForCausalLM"),
    )]));
    writer.add_aux_file("config.json", br#"{"hidden_size":8}"#.to_vec())?;
    writer.add_fixed(
        "model.norm.weight",
        Dtype::F16,
        vec![8],
        vec![0x3c; 16],
        "BF16",
    )?;
    let shapes = [(8usize, 8usize), (4, 8)];
    for (j, (m, n)) in shapes.iter().enumerate() {
        writer.add_matrix(format!("model.layers.0.m{j}.weight"), *m, *n, "BF16")?;
    }
    let order = [(0usize, 0usize), (1, 0), (1, 1), (0, 1)];
    for (p, (mat, idx)) in order.into_iter().enumerate() {
        let (m, n) = shapes[mat];
        let fill = u8::try_from(p).unwrap_or(0);
        let parts = vec![
            PartData::new(
                "signs",
                Dtype::U8,
                vec![(m * n).div_ceil(8)],
                vec![fill; (m * n).div_ceil(8)],
            ),
            PartData::new("u", Dtype::F16, vec![m, 1], vec![fill; 2 * m]),
            PartData::new("v", Dtype::F16, vec![1, n], vec![fill; 2 * n]),
        ];
        writer.push_block(
            mat,
            idx,
            "avd",
            BTreeMap::from([("k".to_owned(), 1)]),
            parts,
        )?;
    }
    writer.set_mandatory_blocks(2);
    let written = writer.write_atomic(&path)?;
    let container = Container::open(&path)?;
    container.verify_all()?;
    println!(
        "{path}: {written} bytes, {} blocks",
        container.total_blocks()
    );
    Ok(())
}
