"""`tensorfleet bench --compare-hf CONFIG` (deploy/bench/compare_hf.py), end to end on the
tiny Llama: both systems run the same workload in the same dtype, and the report holds up."""

import json

import pytest

from cluster import config as config_module
from deploy.bench.workload import WorkloadSpec, make_workload
from deploy.cli.main import main


def test_compare_hf_runs_both_sides_in_the_resolved_dtype(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: False)  # dtype: auto -> float32
    path, _ = tiny_llama_dir
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({
        "model": str(path), "dtype": "auto", "parallel": {"device": "cpu"},
        "engine": {"max_model_len": 128, "block_size": 8, "num_kv_blocks": 256, "max_num_seqs": 8},
    }))
    out = tmp_path / "compare.json"
    assert main(["bench", "--compare-hf", str(config), "--num-requests", "6", "--prompt-len", "8:40",
                 "--output-len", "2:12", "--decode-tokens", "12", "--repeats", "1", "--hf-batch-sizes", "2,4",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    work = make_workload(WorkloadSpec(6, (8, 40), (2, 12), vocab_size=1000))
    assert (report["dtype"], report["tp"], report["pp"]) == ("float32", 1, 1)

    d = report["decode"]
    assert d["first_mismatch"] is None  # float32 greedy tokens equal HF generate's
    assert d["prompt_len"] == min(32, len(work.prompts[0])) and d["new_tokens"] == 12
    assert d["bound_tok_s"] == pytest.approx(d["copy_bandwidth_gb_s"] * 1e9 / d["weight_bytes_per_token"])
    assert d["vs_hf"] == pytest.approx(d["tensorfleet_tok_s"] / d["hf_tok_s"])
    assert d["tensorfleet_of_bound"] == pytest.approx(d["tensorfleet_tok_s"] / d["bound_tok_s"])

    m = report["mixed"]
    for side in (m["tensorfleet"], m["hf_best"]):
        assert (side["completed"], side["output_tokens"]) == (6, work.output_tokens)
    assert set(m["hf_tok_s_by_batch_size"]) == {"2", "4"}
    assert m["hf_best"]["output_tok_s"] == max(m["hf_tok_s_by_batch_size"].values())
    assert m["vs_hf"] == pytest.approx(m["tensorfleet"]["output_tok_s"] / m["hf_best"]["output_tok_s"])
    [rank] = m["tensorfleet"]["ranks"]
    assert rank["steps"] > 0 and rank["all_reduces"] == 0


def test_compare_hf_names_a_workload_the_config_cannot_hold(tiny_llama_dir, tmp_path, capsys):
    path, _ = tiny_llama_dir
    config = tmp_path / "short.yaml"
    config.write_text(json.dumps({"model": str(path), "dtype": "float32", "parallel": {"device": "cpu"},
                                  "engine": {"max_model_len": 64, "block_size": 8, "num_kv_blocks": 64}}))
    assert main(["bench", "--compare-hf", str(config), "--num-requests", "2", "--prompt-len", "40:60",
                 "--output-len", "20:30", "--decode-tokens", "4", "--repeats", "1", "--no-progress"]) != 0
    assert "max_model_len" in capsys.readouterr().err
