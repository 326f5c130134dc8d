"""report.md: the human-readable twin of report.json."""

from __future__ import annotations


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def render_markdown(metadata: dict, report: dict) -> str:
    lines = [f"# vitedge report: {metadata.get('family')} ({metadata.get('arch', {}).get('embed_dim')}-dim, "
             f"{metadata.get('arch', {}).get('depth')} blocks, {metadata['input']['shape'][2]} px)", ""]
    flops = metadata.get("flops", {})
    if flops:
        lines += [f"- FLOPs: {flops['static'] / 1e9:.3f} G static vs {flops['dense'] / 1e9:.3f} G dense "
                  f"(ratio {flops['ratio']:.3f})"]
    budgets = metadata.get("token_budgets", {})
    for step in budgets.get("selections", []):
        lines.append(f"- block {step['block']}: keeps {step['kept_patches']} patch tokens, {step['tokens_after']} tokens after")
    lines.append("")
    check = report.get("check")
    if check:
        lines += ["## Check", "", f"**{'passed' if check['passed'] else 'FAILED'}** (opset {check['opset']})", ""]
        lines += [f"- error: {e}" for e in check["errors"]] + [f"- warning: {w}" for w in check["warnings"]]
        if check.get("sizes"):
            lines.append(f"- dynamic resolution, checked at {', '.join(map(str, check['sizes']))} px")
        if check.get("topk_k"):
            lines.append(f"- TopK K (constants): {check['topk_k']}")
        lines.append("")
    for key in [k for k in report if k == "validate" or k.startswith("validate_")]:
        lines += _validation_lines(report[key])
    profile = report.get("profile")
    if profile:
        lines += ["## Profile", "", "| backend | batch | threads | p50 ms | p90 ms | p99 ms | img/s |", "|---|---|---|---|---|---|---|"]
        for result in profile.values():
            lines.append(f"| {result['backend']}{' ' + result['precision'] if 'precision' in result else ''} | {result['batch']} | {result['threads']} | {result['p50_ms']:.2f} | "
                         f"{result['p90_ms']:.2f} | {result['p99_ms']:.2f} | {result['throughput_img_s']:.1f} |")
        lines.append("")
        lines += _profile_details(profile)
    build = report.get("build")
    if build:
        lines += _build_section(build)
    tune = report.get("tune")
    if tune:
        chosen = tune["chosen"]
        lines += ["## Budget search", "",
                  f"Chosen by `vitedge tune` as the most accurate candidate with {tune['statistic']} <= "
                  f"{tune['budget_ms']:g} ms on {tune['backend']}: {tune['statistic']} {chosen['latency_ms']:.2f} ms, "
                  f"accuracy {_pct(chosen['accuracy'])}. All candidates: tune.md.", ""]
    lines += _quantized_markdown(report.get("quantized", {}))
    return "\n".join(lines)


def _validation_lines(validate: dict) -> list[str]:
    size = f", {validate['img_size']} px" if "img_size" in validate else ""
    lines = ["## Validation (ONNX Runtime vs reference PyTorch)", "",
             f"**{'passed' if validate['passed'] else 'FAILED'}** on {validate['images']} {validate['data']} images{size}", "",
             "| metric | value |", "|---|---|",
             f"| top-1 agreement | {_pct(validate['top1_agreement'])} |",
             "| max abs logit diff (images whose selections agree) | "
             + (f"{validate['max_abs_logit_diff']:.2e} |" if validate["max_abs_logit_diff"] is not None else "no such image |"),
             f"| mean abs logit diff | {validate['mean_abs_logit_diff']:.2e} |"]
    if validate.get("kept_agreement"):
        lines += [f"| every selection identical | {_pct(validate['selections_identical'])} |",
                  f"| max abs logit diff (all images) | {validate['max_abs_logit_diff_all']:.2e} |"]
    ties = validate.get("near_ties", {})
    for name, value in validate["kept_agreement"].items():
        tie = ties.get(name)
        note = f" ({tie['count']} near-ties)" if tie and tie["count"] else ""
        lines.append(f"| {name} set agreement | {_pct(value)}{note} |")
    if ties:
        lines.append(f"| near-tie rule | {validate['near_tie_tolerance']['rule']} |")
    if "exported_accuracy" in validate:
        lines.append(f"| accuracy (reference / exported) | {_pct(validate['reference_accuracy'])} / {_pct(validate['exported_accuracy'])} |")
    return lines + [""] + [f"- failure: {f}" for f in validate["failures"]] + _data_lines(validate) + [""]


def _data_lines(section: dict) -> list[str]:
    """The images a section was measured on: their transform, whether they are the model's domain, skips."""
    lines = [f"- note: {section['domain_note']}"] if section.get("domain_note") else []
    if section.get("transform"):
        t = section["transform"]
        lines.append(f"- transform: {t['channels']}, short side {t['resize']} ({t['interpolation']}), {t['crop']} crop "
                     f"{t['size']} (crop_pct {t['crop_pct']:g}, preset {t.get('preset')})")
    if section.get("skipped_images"):
        lines.append(f"- skipped {section['skipped_images']} unreadable image(s), e.g. {section['skipped_examples'][0]}")
    return lines


def _profile_details(profile: dict) -> list[str]:
    """Budgets, TensorRT's stage breakdown and histograms under the profile table."""
    lines = []
    for result in profile.values():
        name = result["backend"] + (f" on {result['device']}" if result.get("device") else "")
        budget = result.get("budget")
        if budget:
            lines.append(f"- {name}: **{'PASS' if budget['passed'] else 'FAIL'}**, {budget['statistic']} "
                         f"{budget['measured_ms']:.2f} ms vs budget {budget['budget_ms']:g} ms "
                         f"(margin {budget['margin_ms']:+.2f} ms)")
        if "gpu_compute_ms" in result:
            lines.append(f"- {name}: GPU compute p50 {result['gpu_compute_ms']['p50_ms']:.3f} ms, "
                         f"H2D p50 {result['h2d_ms']['p50_ms']:.3f} ms, D2H p50 {result['d2h_ms']['p50_ms']:.3f} ms; "
                         f"end to end p50 {result['p50_ms']:.3f} ms on {result['gpu'].get('name')}")
        if result.get("histogram"):
            lines.append(f"- {name}: ![latency histogram]({result['histogram']})")
    return lines + ([""] if lines else [])


def _build_section(build: dict) -> list[str]:
    gpu = build.get("gpu") or {}
    lines = ["## TensorRT engine", "",
             f"- {build['plan']}: TensorRT {build['tensorrt']}, {gpu.get('name')} (compute capability "
             f"{gpu.get('compute_capability')}), precision {build['precision']} from {build['onnx']}"
             + (f", device {build['device']}" if build.get("device") else "")
             + (f", DLA core {build['dla_core']} with GPU fallback" if build.get("dla_core") is not None else ""),
             "- layers by precision (engine inspector): "
             + ", ".join(f"{p} {n}" for p, n in build.get("layer_precisions", {}).items())]
    if build.get("profile"):
        lines.append(f"- optimisation profile: min {build['profile']['min']}, opt {build['profile']['opt']}, max {build['profile']['max']}")
    return lines + [""]


def _quantized_markdown(sections: dict) -> list[str]:
    """The quantized models: how each was made, its check, and its agreement with the FP32 graph."""
    lines = []
    for precision, section in sections.items():
        info, check, validate = section.get("quantize", {}), section.get("check"), section.get("validate")
        lines += [f"## Quantized: {precision} ({info.get('model', '')})", ""]
        if info.get("calibration"):
            cal = info["calibration"]
            lines.append(f"- calibration: {cal['name']} ({cal['images']} images, {info['method']}), data sha256 {cal['data_sha256'][:16]}")
            if cal.get("domain_note"):
                lines.append(f"- note: {cal['domain_note']}")
        if info:
            lines.append(f"- selection path {'quantized' if info.get('selection_quantized') else 'kept in FP32'}; "
                         f"size {info.get('size_bytes', 0) / 1e6:.2f} MB")
        if check:
            lines.append(f"- check: **{'passed' if check['passed'] else 'FAILED'}**" + "".join(f"; {e}" for e in check["errors"]))
        if validate:
            lines += ["", f"**{'passed' if validate['passed'] else 'FAILED'}** on {validate['images']} {validate['data']} images "
                      "(ONNX Runtime, against the FP32 graph)", "", "| metric | value |", "|---|---|",
                      f"| top-1 agreement | {_pct(validate['top1_agreement'])} |",
                      f"| max abs logit diff | {validate['max_abs_logit_diff']:.2e} |"]
            for name, value in validate["kept_agreement"].items():
                lines.append(f"| {name} set agreement | {_pct(value)} |")
            if "accuracy" in validate:
                lines.append(f"| accuracy (FP32 / {precision}) | {_pct(validate['fp32_accuracy'])} / {_pct(validate['accuracy'])} |")
            first = {k: v for k, v in validate["first_disagreement"].items() if k != "none"}
            if first:
                lines.append("| first selection disagreement (images) | " + ", ".join(f"{k}: {v}" for k, v in first.items()) + " |")
            lines += [""] + [f"- failure: {f}" for f in validate["failures"]]
        lines.append("")
    return lines
