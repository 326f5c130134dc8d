"""Settings resolved from data: a family's ``calibrated_settings`` (A-ViT's budget quantile → token budgets).

Some settings only become a static graph on real images: a family declares them
(``Family.calibrated_settings``) and resolves them in its hooks (``calibrate_candidates`` for
export and tune, ``calibrate`` for the ``vitedge calibrate`` file). Calibration images are never
the images accuracy is measured on: a calibration set (``calibration/*.yaml``) or, for the
file, the *train* split. The file is small JSON meant to be committed
(``calibration/<model>-<family>-….json``); its values are the settings whose CLI alias is
``from_file`` (e.g. ``vitedge export --budgets FILE``), checked against the model they are for.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from pathlib import Path

from .artifact import write_json_atomic
from .backbone import dense_flops
from .data.calibration_sets import (
    DEFAULT_SET,
    array_sha256,
    calibration_array,
    default_set,
    load_calibration_set,
    set_out_of_domain,
)
from .data import check_source, default_source, load_dataset, make_transform, out_of_domain
from .errors import VitedgeError
from .families import Family, available_families, get_family
from .load import LoadedModel, load_model, read_checkpoint
from .reading import read_json
from .schema import CALIBRATION_FILE, check
from .recipe import load_recipe, merge

CALIBRATION_KIND = "vitedge-token-budgets"  # the first calibrated settings were token budgets; files keep the kind
DEFAULT_LIMIT = 2000


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def file_settings(family: Family) -> list[str]:
    """The settings a calibration file provides: those whose CLI alias reads them from a file."""
    return [s.name for s in family.settings if any(a.from_file for a in s.aliases)]


def _require_calibrated(family: Family) -> None:
    if not family.calibrated_settings:
        having = [name for name in available_families() if get_family(name).calibrated_settings]
        raise VitedgeError(f"family '{family.name}' has no settings calibrated on data; families that do: "
                           f"{', '.join(having) or 'none'}")


def with_settings(loaded: LoadedModel, overrides: dict) -> LoadedModel:
    """``loaded`` with ``overrides`` on its settings: re-resolved, re-planned, the reference rebuilt on the same weights."""
    fam, cfg = loaded.family, loaded.cfg
    settings = fam.resolve_settings(cfg, {**loaded.settings, **overrides})
    model = fam.reference(cfg, settings)
    model.load_state_dict(loaded.model.state_dict())
    model.eval()
    model.set_fused_attention(True)
    return dataclasses.replace(loaded, model=model, settings=settings, plan=fam.token_plan(cfg, settings))


def calibration_images(calib, loaded: LoadedModel, ranked_data: str | None = None) -> tuple:
    """A calibration set's images for this model and their record; never ``ranked_data``, the images accuracy is ranked on.

    ``calib`` None: the model's default set (Fashion-MNIST train images for grey models, the bundled samples for RGB)."""
    cset = load_calibration_set(calib or default_set(loaded.cfg.in_chans))
    if ranked_data is not None:
        same = (cset.source == "fashion-mnist" and ranked_data == "fashion-mnist" and cset.split == "test") or (
            cset.source == "image-folder" and ranked_data != "fashion-mnist" and Path(ranked_data).resolve() == cset.path)
        if same:
            raise VitedgeError(f"calibration set '{cset.name}' holds the images accuracy is ranked on ({ranked_data}); "
                               f"calibrate on other images, e.g. --calib {DEFAULT_SET}")
    transform = make_transform(loaded.cfg.img_size, loaded.cfg.in_chans, loaded.mean, loaded.std)
    images = calibration_array(cset, transform)
    split = cset.split if cset.source == "fashion-mnist" else None
    return images, {**cset.record(), "split": split, "images": int(len(images)), "sha256": array_sha256(images)}


def load_calibrated(checkpoint, family: str | None = None, arch: str | None = None, settings: dict | None = None,
                    img_size: int | None = None, num_heads: int | None = None, calibration=None,
                    calib=None, log=_stderr) -> LoadedModel:
    """``load_model`` with the family's data-dependent settings resolved: read from ``calibration``
    (a ``vitedge calibrate`` file) or, when ``settings`` give one of them, calibrated now on the
    calibration set ``calib``."""
    ckpt = read_checkpoint(checkpoint)
    settings = dict(settings or {})
    name = family or ckpt.metadata.get("family")
    pending = get_family(name).pending_calibration(settings) if name else {}
    settings = {k: v for k, v in settings.items() if k not in pending}
    loaded = load_model(ckpt, family=family, arch=arch, settings=settings, img_size=img_size, num_heads=num_heads)
    if calibration is not None:
        if pending:
            raise VitedgeError(f"give a calibration file or {', '.join(pending)}, not both")
        return with_settings(loaded, read_calibration(calibration, loaded))
    if not pending:
        return loaded
    wanted = loaded.family.resolve_settings(loaded.cfg, {**loaded.settings, **pending})  # bad values fail before the images load
    images, record = calibration_images(calib, loaded)
    log(f"      calibrating {', '.join(pending)} on {record['name']} ({record['images']} images)")
    what = set_out_of_domain(record["source"], loaded.cfg.in_chans, loaded.cfg.num_classes)
    if what:
        log(f"      note: {', '.join(pending)} calibrated on {what}: the graph runs, but in-domain images are needed "
            "for values that fit your data (--calib FOLDER or a calibration YAML)")
    [resolved] = loaded.family.calibrate_candidates(loaded.model, loaded.cfg, [wanted], images)
    return with_settings(loaded, resolved)


def calibrate(
    checkpoint,
    output_file,
    data: str | None = None,
    flops_ratio: float | None = None,
    limit: int | None = DEFAULT_LIMIT,
    family: str | None = None,
    num_heads: int | None = None,
    settings: dict | None = None,
    recipe=None,
    log=_stderr,
    shuffle_seed: int | None = None,
    skip_bad_images: bool = False,
    **named_settings,
) -> dict:
    """checkpoint → calibration file (JSON): the family's data-dependent settings resolved on ``data`` (train split).

    ``settings`` (or keyword arguments, ``NAME=value``) and ``recipe`` (family,
    num_heads, settings such as A-ViT's gates) describe the model the export will build;
    ``data`` None: Fashion-MNIST for grey models, the bundled samples for RGB ones (a note says
    when the images are not the model's domain). ``flops_ratio`` asks for the largest setting within that FLOPs ratio to dense instead.
    Raises VitedgeError on bad input before anything is written; the file lands atomically.
    Returns the file's content plus a short ``summary``.
    """
    check_source(data, limit)
    output_file = Path(output_file)
    if not output_file.parent.is_dir():
        raise VitedgeError(f"output folder {output_file.parent} does not exist")
    if flops_ratio is not None and not 0.0 < flops_ratio <= 1.0:
        raise VitedgeError(f"FLOPs target must be a ratio to dense in (0, 1], got {flops_ratio:g}")
    options = merge(load_recipe(recipe), {"family": family, "num_heads": num_heads,
                                          "settings": {**(settings or {}), **named_settings}})
    ckpt = read_checkpoint(checkpoint)
    name = options.get("family") or ckpt.metadata.get("family")
    requested = dict(options["settings"])
    pending = {k: requested.pop(k) for k in (get_family(name).calibrated_settings if name else ()) if k in requested}
    loaded = load_model(ckpt, family=options.get("family"), arch=options.get("arch"), settings=requested,
                        img_size=options.get("img_size"), num_heads=options.get("num_heads"))
    fam, cfg = loaded.family, loaded.cfg
    _require_calibrated(fam)
    wanted = fam.check_settings(pending)
    if flops_ratio is not None and wanted:
        raise VitedgeError(f"give {', '.join(wanted)} or a FLOPs target, not both")
    data = default_source(cfg.in_chans) if data in (None, "default") else data
    log(f"calibrating {fam.name} on {data} (train split{f', {limit} images' if limit else ''})")
    dataset = load_dataset(data, limit, split="train", shuffle_seed=shuffle_seed, skip_bad=skip_bad_images,
                           in_chans=cfg.in_chans)
    transform = make_transform(cfg.img_size, cfg.in_chans, loaded.mean, loaded.std, options.get("transform"))
    what = out_of_domain(dataset, cfg.in_chans, cfg.num_classes)
    note = None
    if what:
        note = (f"settings calibrated on {what}: the graph runs, but in-domain images are needed for values "
                "that fit your data (calibrate with --data FOLDER)")
        log(f"note: {note}")
    resolved, record, summary = fam.calibrate(loaded.model, cfg, {**loaded.settings, **wanted},
                                              lambda: (images for images, _ in dataset.batches(transform, 100)), flops_ratio)
    inputs = {k: v for k, v in loaded.settings.items() if k not in file_settings(fam) and k not in fam.calibrated_settings}
    plan = fam.token_plan(cfg, resolved)
    content = {
        "kind": CALIBRATION_KIND,
        "family": fam.name,
        "checkpoint": {"path": str(loaded.checkpoint.path), "sha256": loaded.checkpoint.sha256},
        "arch": cfg.to_dict(),
        "settings": inputs,
        "data": {"source": dataset.name, "split": "train", "images": int(record.pop("images"))},
        "data_in_domain": note is None,
        **({"domain_note": note} if note else {}),
        "transform": transform.to_dict(),
        **record,
        **{k: resolved[k] for k in file_settings(fam)},
        "flops": {"dense": dense_flops(cfg), "static": plan.flops(cfg), "ratio": round(plan.flops(cfg) / dense_flops(cfg), 4)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(output_file, content)
    summary = {**{k: resolved[k] for k in file_settings(fam)}, **summary, "flops": content["flops"]}
    log(f"{', '.join(f'{k} {v}' for k, v in summary.items() if k != 'flops')}, FLOPs {content['flops']['ratio']:.3f} "
        f"of dense -> {output_file}")
    return {**content, "summary": summary}


def read_calibration(path, loaded: LoadedModel) -> dict:
    """The settings a calibration file provides, checked against the model they are for."""
    path = Path(path)
    content = read_json(path, "calibration file")
    if not isinstance(content, dict) or content.get("kind") != CALIBRATION_KIND:
        raise VitedgeError(f"{path} is not a vitedge calibration file; write one with 'vitedge calibrate'")
    check(content, CALIBRATION_FILE, path, "calibration file")
    fam, cfg = loaded.family, loaded.cfg
    if content.get("family") != fam.name:
        raise VitedgeError(f"{path} was calibrated for family '{content.get('family')}', this export is "
                           f"'{fam.name}'; calibrate this model")
    provided = file_settings(fam)
    if any(name not in content for name in provided):
        raise VitedgeError(f"{path} holds no {', '.join(provided)}; write it with 'vitedge calibrate'")
    arch = content.get("arch") or {}
    tokens = cfg.num_patches + 1
    theirs = (arch.get("depth"), (arch.get("img_size", 0) // max(1, arch.get("patch_size", 1))) ** 2 + 1, arch.get("embed_dim"))
    if theirs != (cfg.depth, tokens, cfg.embed_dim):
        raise VitedgeError(
            f"{path} was calibrated for a model with {theirs[0]} blocks, {theirs[1]} tokens, {theirs[2]} channels; "
            f"this one has {cfg.depth}, {tokens}, {cfg.embed_dim}: calibrate this model"
        )
    if (content.get("checkpoint") or {}).get("sha256") != loaded.checkpoint.sha256:
        raise VitedgeError(f"{path} was calibrated for another checkpoint (sha256 differs from {loaded.checkpoint.path}); "
                           "re-run 'vitedge calibrate' on this one")
    recorded = content.get("settings") or {}
    differ = {k: v for k, v in recorded.items() if k in loaded.settings and loaded.settings[k] != v}
    if differ:
        raise VitedgeError(f"{path} was calibrated with {_listing(recorded, differ)}, this export uses "
                           f"{_listing(loaded.settings, differ)}; re-calibrate with the export's settings")
    return {name: content[name] for name in provided}


def _listing(settings: dict, names) -> str:
    return ", ".join(f"{name} {settings[name]:g}" if isinstance(settings[name], float) else f"{name} {settings[name]}"
                     for name in names)


__all__ = ["calibrate", "calibration_images", "load_calibrated", "read_calibration", "with_settings"]
