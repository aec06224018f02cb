//! MEGALODON configuration: JSON form, validation errors, presets, and parameter counts
//! against the official presets' counts (spec `megalodon.md` §11).

use mega::config::{MegalodonConfig, ModelConfig};
use mega::model::megalodon::Megalodon;

const TINY_JSON: &str = r#"{"model": "megalodon", "vocab_size": 256, "model_dim": 32,
 "num_layers": 2, "num_heads": 2, "z_dim": 16, "value_dim": 24, "cema_ndim": 4,
 "norm_num_groups": 4, "chunk_size": 8, "ffn_hidden_dim": 48, "swiglu": true,
 "rope_base": 10000.0, "norm_eps": 1e-5, "share_emb": false, "scale_emb": false}"#;

#[test]
fn the_documented_json_is_the_tiny_preset_and_round_trips() {
    let cfg = ModelConfig::from_json(TINY_JSON, "doc").unwrap();
    assert_eq!(
        cfg,
        ModelConfig::Megalodon(MegalodonConfig::preset("tiny").unwrap())
    );
    let again = ModelConfig::from_json(&cfg.to_json().to_string(), "round trip").unwrap();
    assert_eq!(again, cfg);
}

#[test]
fn unknown_fields_are_rejected() {
    let text = TINY_JSON.replace("\"swiglu\"", "\"dropout\": 0.1, \"swiglu\"");
    let err = ModelConfig::from_json(&text, "extra")
        .unwrap_err()
        .to_string();
    assert!(err.contains("dropout"), "{err}");
}

#[test]
fn invalid_shapes_are_reported_by_field() {
    let tiny = MegalodonConfig::preset("tiny").unwrap();
    let cases: Vec<(MegalodonConfig, &str)> = vec![
        (
            MegalodonConfig {
                norm_num_groups: 5,
                ..tiny.clone()
            },
            "norm_num_groups",
        ),
        (
            MegalodonConfig {
                z_dim: 18,
                ..tiny.clone()
            },
            "z_dim",
        ),
        (
            // 2 heads of width 7: odd, RoPE needs pairs.
            MegalodonConfig {
                z_dim: 14,
                ..tiny.clone()
            },
            "even",
        ),
        (
            MegalodonConfig {
                value_dim: 25,
                ..tiny.clone()
            },
            "value_dim",
        ),
        (
            MegalodonConfig {
                vocab_size: 32000,
                ..tiny.clone()
            },
            "vocab_size",
        ),
        (
            MegalodonConfig {
                chunk_size: 0,
                ..tiny.clone()
            },
            "chunk_size",
        ),
        (
            MegalodonConfig {
                norm_eps: 0.0,
                ..tiny.clone()
            },
            "norm_eps",
        ),
        (
            MegalodonConfig {
                rope_base: f64::NAN,
                ..tiny.clone()
            },
            "rope_base",
        ),
    ];
    for (cfg, field) in cases {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains(field),
            "expected an error naming {field}: {err}"
        );
    }
}

#[test]
fn every_preset_is_valid_and_unknown_names_list_them() {
    for name in MegalodonConfig::PRESETS {
        MegalodonConfig::preset(name)
            .unwrap()
            .validate()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let err = MegalodonConfig::preset("huge").unwrap_err().to_string();
    assert!(
        err.contains("mega7.3B") && err.contains("paper-7b"),
        "{err}"
    );
}

#[test]
fn the_quickstart_and_bench_presets_have_the_intended_sizes() {
    let small = Megalodon::new(&MegalodonConfig::preset("small").unwrap());
    let n = small.layout.numel();
    assert!((10_000_000..=20_000_000).contains(&n), "small has {n}");
    // tools/bench_megalodon_peers.py BENCH_CONFIG.
    let bench = MegalodonConfig::preset("bench").unwrap();
    assert_eq!(
        (
            bench.model_dim,
            bench.num_layers,
            bench.num_heads,
            bench.z_dim,
            bench.value_dim,
            bench.cema_ndim,
            bench.norm_num_groups,
            bench.chunk_size,
            bench.ffn_hidden_dim,
            bench.swiglu,
            bench.share_emb,
        ),
        (512, 6, 2, 128, 1024, 16, 32, 256, 1024, true, false)
    );
    let paper = MegalodonConfig::preset("paper-7b").unwrap();
    assert_eq!((paper.chunk_size, paper.rope_base), (4096, 1e5));
}

#[test]
fn official_presets_have_the_official_parameter_counts_at_vocab_32000() {
    // spec §11: counts of the official presets with the Llama-2 vocabulary.
    for (name, want) in [
        ("mega200M", 220_627_968usize),
        ("mega1.3B", 1_342_832_640),
        ("mega1.3B_pg19", 1_327_628_288),
        ("mega7.1B", 7_117_381_632),
        ("mega7.3B", 7_385_817_088),
    ] {
        let cfg = MegalodonConfig {
            vocab_size: 32000,
            ..MegalodonConfig::preset(name).unwrap()
        };
        assert_eq!(Megalodon::new(&cfg).layout.numel(), want, "{name}");
    }
}
