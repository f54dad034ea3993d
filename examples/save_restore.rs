//! Save a small training state, keep training while it becomes durable,
//! then restore it and check every byte.
//!
//! ```sh
//! cargo run --release --example save_restore -- /tmp/cairn-example
//! ```

use cairn::{DType, SaveState, StepSel, Store, StoreOptions, TensorFilter};

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; every byte is initialized.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
}

fn main() -> cairn::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("cairn-example")
            .display()
            .to_string()
    });
    let store = Store::open(
        &dir,
        StoreOptions {
            staging_bytes: 64 << 20,
            ..StoreOptions::default()
        },
    )?;
    let step = store.latest("example")?.map_or(0, |s| s + 1);

    // A tiny "model": two weight matrices, a bias, and Adam moments.
    let mut w1: Vec<f32> = (0..512 * 512).map(|i| (i as f32).sin() * 0.02).collect();
    let w2: Vec<f32> = (0..512 * 2048).map(|i| (i as f32).cos() * 0.02).collect();
    let bias = vec![0.1f32; 512];
    let exp_avg = vec![0.0f32; w1.len()];
    let expected_w1 = w1.clone();

    let state = SaveState::new()
        .tensor("layer1.weight", DType::F32, &[512, 512], as_bytes(&w1))
        .tensor("layer2.weight", DType::F32, &[2048, 512], as_bytes(&w2))
        .tensor("layer1.bias", DType::F32, &[512], as_bytes(&bias))
        .tensor(
            "optimizer.layer1.weight.exp_avg",
            DType::F32,
            &[512, 512],
            as_bytes(&exp_avg),
        )
        .blob("rng_state", &[7u8; 32])
        .metadata(serde_json::json!({"step": step, "lr": 3e-4}));
    let handle = store.save("example", step, &state)?;
    println!("staged step {step} in {:?}", handle.stall());
    drop(state);

    // Training continues: the buffers may change while the save drains.
    w1.iter_mut().for_each(|x| *x += 1.0);

    let report = handle.wait()?;
    println!(
        "durable in {:?}: {} logical bytes, {} written, {} deduplicated",
        report.durable, report.logical_bytes, report.bytes_written, report.bytes_deduped
    );

    let restored = store.restore("example", StepSel::Latest, &TensorFilter::All)?;
    let got = &restored.tensor("layer1.weight").expect("saved above").data;
    assert_eq!(
        got.as_slice(),
        as_bytes(&expected_w1),
        "restored bytes differ"
    );
    println!(
        "restored step {} ({} tensors, {} chunks) and verified every byte",
        restored.report.step,
        restored.tensors.len(),
        restored.report.chunks_read
    );
    Ok(())
}
