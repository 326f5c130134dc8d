"""vitedge.export / pipeline.export: the artifact an export writes, opsets, batches, and failures."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from support import FMNIST, HEADS, REPO, copy_artifact, folder_listing, quiet, read_json, run_cli

import vitedge
from vitedge.backbone import dense_flops
from vitedge.check import check_model
from vitedge.errors import VitedgeError
from vitedge.export import export_onnx
from vitedge.load import load_model
from vitedge.rewrite import to_static
from vitedge.runtime import ort_session, run_batched


def test_artifact_holds_exactly_the_four_files(artifact):
    assert sorted(os.listdir(artifact)) == ["model.onnx", "report.json", "report.md", "vitedge.json"]


def test_metadata_records_what_the_export_did(evit_artifact, evit_ckpt):
    meta = read_json(evit_artifact / "vitedge.json")
    loaded = load_model(evit_ckpt, family="evit", num_heads=HEADS)
    assert meta["family"] == "evit"
    assert meta["arch"] == FMNIST.to_dict()
    assert meta["settings"] == {"keep_rate": [0.7, 0.7, 0.7], "prune_blocks": [3, 6, 9], "fuse_token": True}
    assert meta["input"]["name"] == "images" and meta["input"]["shape"] == [1, 1, 28, 28] and meta["input"]["batch"] == 1
    assert meta["input"]["mean"] == [0.2860] and meta["input"]["std"] == [0.3530]
    assert meta["outputs"] == ["logits", "kept_tokens_3", "kept_tokens_6", "kept_tokens_9"]
    assert meta["token_budgets"] == loaded.plan.to_dict()
    assert meta["flops"]["dense"] == dense_flops(FMNIST)
    assert meta["flops"]["ratio"] == pytest.approx(loaded.plan.flops(FMNIST) / dense_flops(FMNIST))
    assert meta["flops"]["ratio"] < 1
    assert meta["checkpoint"]["path"] == str(evit_ckpt.resolve())
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(evit_ckpt.read_bytes()).hexdigest()
    assert meta["validation"] == {"min_top1_agreement": 0.999, "min_kept_agreement": 0.999, "max_abs_logit_diff": 1e-3}
    assert {"vitedge", "torch", "onnx", "onnxruntime"} <= set(meta["tools"])


def test_recorded_opset_is_the_graph_opset(artifact):
    meta = read_json(artifact / "vitedge.json")
    proto = onnx.load(str(artifact / "model.onnx"))
    graph_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert meta["opset"] == graph_opset


def test_report_has_check_and_validation(artifact):
    report = read_json(artifact / "report.json")
    assert report["check"]["passed"] is True and len(report["check"]["topk_k"]) == 3
    assert report["validate"]["passed"] is True and report["validate"]["images"] == 128
    assert report["validate"]["top1_agreement"] == 1.0
    markdown = (artifact / "report.md").read_text()
    assert "## Check" in markdown and "## Validation" in markdown and "FAILED" not in markdown


def test_onnx_is_valid_and_static(artifact):
    proto = onnx.load(str(artifact / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    assert inp.name == "images"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 1, 28, 28]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output][1:] == [onnx.TensorProto.INT32] * 3


def test_export_onnx_rejects_old_opsets_and_bad_batches(evit_ckpt, tmp_path):
    loaded = load_model(evit_ckpt, family="evit", num_heads=HEADS)
    static = to_static(loaded.model, loaded.plan)
    with pytest.raises(VitedgeError, match="opset 16 is too old; vitedge needs opset >= 17"):
        export_onnx(static, loaded.cfg, loaded.plan, tmp_path / "m.onnx", opset=16)
    with pytest.raises(VitedgeError, match="batch size must be >= 1"):
        export_onnx(static, loaded.cfg, loaded.plan, tmp_path / "m.onnx", batch_size=0)
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def dynamic_batch_export(tmp_path_factory, evit_ckpt):
    """The bundled-model recipe export_recipes/fmnist-evit.yaml (dynamic batch) on the test checkpoint."""
    out = tmp_path_factory.mktemp("dynamic") / "evit-dyn"
    result = run_cli("export", evit_ckpt, "-o", out, "--recipe", REPO / "export_recipes" / "fmnist-evit.yaml",
                     "--num-heads", str(HEADS), "--validate-limit", "64")
    assert result.exit_code == 0, result.output
    return out


def test_dynamic_batch_graph(dynamic_batch_export, evit_artifact, fmnist_batch):
    meta = read_json(dynamic_batch_export / "vitedge.json")
    assert meta["input"]["batch"] == "dynamic" and meta["input"]["shape"][0] == "dynamic"
    assert meta["validation"]["max_abs_logit_diff"] == 1e-4  # from the recipe
    proto = onnx.load(str(dynamic_batch_export / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    result = check_model(proto)
    assert result.passed, result.errors
    assert result.topk_k == [35, 26, 19]  # token counts stay constant with a symbolic batch
    images = fmnist_batch[0][:5]
    session = ort_session(dynamic_batch_export / "model.onnx")
    batched = session.run(None, {"images": images})
    one_by_one = run_batched(ort_session(evit_artifact / "model.onnx"), images)
    np.testing.assert_allclose(batched[0], one_by_one[0], atol=1e-5)
    for a, b in zip(batched[1:], one_by_one[1:]):
        assert (np.sort(a, 1) == np.sort(b, 1)).all()


def test_failed_export_leaves_a_good_outdir_unchanged(evit_artifact, evit_ckpt, tmp_path):
    outdir = copy_artifact(evit_artifact, tmp_path / "out")
    before = folder_listing(outdir)
    # Fails inside the staged export (after OUTDIR was opened for writing) ...
    with pytest.raises(VitedgeError, match="opset 16 is too old"):
        vitedge.export(evit_ckpt, outdir, family="evit", num_heads=HEADS, opset=16, log=quiet)
    assert folder_listing(outdir) == before
    with pytest.raises(VitedgeError, match="batch size must be >= 1"):
        vitedge.export(evit_ckpt, outdir, family="evit", num_heads=HEADS, batch_size=0, log=quiet)
    assert folder_listing(outdir) == before
    # ... and before it.
    with pytest.raises(VitedgeError, match="keep rate must be in"):
        vitedge.export(evit_ckpt, outdir, family="evit", num_heads=HEADS, keep_rate=0, log=quiet)
    assert folder_listing(outdir) == before


def test_failed_export_to_a_new_outdir_creates_nothing(evit_ckpt, tmp_path):
    outdir = tmp_path / "runs" / "evit"
    with pytest.raises(VitedgeError):
        vitedge.export(evit_ckpt, outdir, family="evit", num_heads=HEADS, opset=16, log=quiet)
    assert os.listdir(tmp_path) == []
