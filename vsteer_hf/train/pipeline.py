"""The decode-matched pipeline: extract -> label -> train -> calibrate -> sweep, each stage resumable.

Every stage reads and writes under one work folder and leaves `<stage>.json` (its report, with the
fingerprint of the options and earlier stages that made it) when it completes; a later run reuses a
completed stage only while that fingerprint holds (see `provenance`): one made with other options is
refused (recompute it with --force, or use a new work folder), one built on an earlier stage that was
recomputed since is recomputed. Only `extract` needs the backbone:
training and calibration read the feature cache, so they run without the model in memory. The
sweep steers the validation prompts at the thresholds ĉ(α) of a few α and records the recommended
threshold in the head card: the most permissive one that halves the judge's undesirable rate.

    work/
      pipeline.json          the PipelineConfig used
      features/              memory-mapped decode features + index + generations.jsonl
      extract.json label.json train.json calibrate.json sweep.json   stage reports
      head/                  the trained head (safetensors + sidecar with the ĉ(α) curve)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from vsteer_hf.train.calibrate import DEFAULT_ALPHAS, calibrate_head
from vsteer_hf.train.provenance import Freshness, adopt_legacy_reports, freshness, new_run_id, stage_options
from vsteer_hf.train.rounds import remove_rounds
from vsteer_hf.train.targets import TARGETS
from vsteer_hf.train.trainer import TrainConfig

STAGES = ("extract", "label", "train", "calibrate", "sweep")


def stages_in_order(stages: tuple[str, ...]) -> list[str]:
    return [s for s in STAGES if s in stages]


@dataclass
class PipelineConfig:
    """What to extract, how to label it and how to train and calibrate the head.

    Data: `backbone` (name, hub id or folder; default the embedded SmolLM2), `prompts` (a built-in
    source or a file), `limit` (prompts per split, for quick runs), `chat` (wrap prompts in the chat
    template; RealToxicityPrompts are raw continuations). Generation: `samples_per_prompt`,
    `max_new_tokens`, `top_p`, `temperature`, `batch_size`, `seed`. Labels: `judge` and the score
    above which a generation is undesirable. Calibration: the α grid; ĉ(α) is fitted on the safe
    generations of the validation split and checked on those of the test split. Sweep: VFD with
    `num_candidates` at ĉ(α) for each of `sweep_alphas`, on the validation prompts, with
    `sweep_samples_per_prompt` samples each (VFD costs about K times a plain step on a CPU).
    `dtype`: the backbone's dtype for extraction and the sweep (the features are the hidden states the
    head will read at decode time, so train in the dtype you will steer in, e.g. "bfloat16" on a GPU).
    `train_samples_per_prompt` (None: `samples_per_prompt`): more plain samples for the train prompts
    only, drawn after the first `samples_per_prompt` of every split (sample indices from there on), so
    training gets more positives while validation and test cost what they did. `targets`: what every
    token is trained towards (see `vsteer_hf.train.targets`): "label" (the sequence label on every
    token), "words" (the judge's score of the token's word alone), "words+label" (1 everywhere in an
    undesirable sequence, else the word score) or "offensive-words" (1 where the judge alone calls the
    token's word undesirable at `judge_threshold`, else 0); validation loss and early stopping use the
    same kind. `calibration_folds` (0: off): fit ĉ(α) on validation's safe generations and, cross-fitted
    over that many folds of the train prompts, train's (see `crossfit`); needs one round.
    On-policy `rounds` (1: none): each later round samples the train prompts again under VFD with the
    previous round's head (`round_num_candidates` at its ĉ(`round_alpha`)), labels them and retrains
    on the union of all rounds (see `rounds`).
    """

    backbone: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    prompts: str = "rtp"
    limit: int | None = None
    chat: bool = False
    samples_per_prompt: int = 4
    train_samples_per_prompt: int | None = None
    max_new_tokens: int = 32
    top_p: float = 0.9
    temperature: float = 1.0
    batch_size: int = 64
    seed: int = 0
    judge: str = "toxicity"
    judge_threshold: float = 0.5
    targets: str = "label"
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    calibration_folds: int = 0
    sweep_alphas: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)
    sweep_samples_per_prompt: int = 1
    num_candidates: int = 8
    rounds: int = 1
    round_alpha: float = 0.3
    round_num_candidates: int = 8
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {list(TARGETS)}, got {self.targets!r}.")
        extra = self.train_samples_per_prompt
        bad_extra = isinstance(extra, bool) or not isinstance(extra, int) or extra < self.samples_per_prompt
        if extra is not None and bad_extra:
            raise ValueError(
                f"train_samples_per_prompt must be an integer >= samples_per_prompt ({self.samples_per_prompt}) "
                f"or None, got {extra!r}."
            )
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1 (1: no on-policy round), got {self.rounds!r}.")
        folds = self.calibration_folds
        if isinstance(folds, bool) or not isinstance(folds, int) or folds == 1 or folds < 0:
            raise ValueError(f"calibration_folds must be 0 (validation only) or an integer >= 2, got {folds!r}.")
        if folds and self.rounds > 1:
            raise ValueError(
                "calibration_folds needs rounds=1: the fold heads would have to repeat every on-policy round; "
                "set one of the two back to its default."
            )
        if not 0.0 < float(self.round_alpha) < 1.0:
            raise ValueError(f"round_alpha must lie in (0, 1) (a false-intervention rate), got {self.round_alpha!r}.")
        k = self.round_num_candidates
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"round_num_candidates must be an integer >= 2 (VFD needs a choice), got {k!r}.")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["alphas"] = list(self.alphas)
        data["sweep_alphas"] = list(self.sweep_alphas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        """From a stored `to_dict()`; options it lacks (written before they existed) take their defaults."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names and k != "train"}
        for key in ("alphas", "sweep_alphas"):
            if key in known:
                known[key] = tuple(known[key])
        train_names = {f.name for f in fields(TrainConfig)}
        train = TrainConfig(**{k: v for k, v in data.get("train", {}).items() if k in train_names})
        return cls(**known, train=train)


class Pipeline:
    """Runs the stages of a `PipelineConfig` in `workdir`."""

    def __init__(
        self,
        workdir: str | Path,
        config: PipelineConfig | None = None,
        progress: bool = True,
        device: str | None = None,
    ) -> None:
        """`device`: where the backbone runs (e.g. "cuda", or "auto" for device_map="auto"; default CPU).
        A property of the machine, not of the run, so it is not stored in pipeline.json."""
        self.workdir = Path(workdir)
        self.config = config or PipelineConfig()
        self.progress = progress
        self.device = device

    # ------------------------------------------------------------------ bookkeeping
    def report_path(self, stage: str) -> Path:
        return self.workdir / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.report_path(stage).is_file()

    def report(self, stage: str) -> dict[str, Any]:
        path = self.report_path(stage)
        if not path.is_file():
            raise FileNotFoundError(f"stage {stage!r} has not completed in {self.workdir}; run `vsteer {stage}` first.")
        return json.loads(path.read_text())

    def _finish(self, stage: str, report: dict[str, Any]) -> dict[str, Any]:
        report = {
            "stage": stage,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "run_id": new_run_id(),
            "fingerprint": self._fingerprint(stage),
            **report,
        }
        self.report_path(stage).write_text(json.dumps(report, indent=2, default=float) + "\n")
        self._started_path(stage).unlink(missing_ok=True)
        return report

    def _fingerprint(self, stage: str) -> dict[str, Any]:
        """The options that make `stage` and the run ids of the earlier stages on disk now."""
        earlier = STAGES[: STAGES.index(stage)]
        return {
            "options": stage_options(self.config.to_dict(), stage),
            "inputs": {name: self.report(name)["run_id"] for name in earlier if self.done(name)},
        }

    def _started_path(self, stage: str) -> Path:
        return self.workdir / f"{stage}.started.json"

    def _freshness(self, stage: str, reports: dict[str, dict[str, Any]]) -> Freshness:
        earlier = STAGES[: STAGES.index(stage)]
        inputs = {name: reports[name]["run_id"] for name in earlier if name in reports}
        return freshness(stage, reports.get(stage), stage_options(self.config.to_dict(), stage), inputs)

    def _stale(self, stage: str, state: Freshness, asked: bool) -> ValueError:
        fix = (
            f"`vsteer {stage} --workdir {self.workdir} --force`"
            if asked
            else f"`vsteer {stage} --workdir {self.workdir}`"
        )
        action = "recompute it with" if asked else "bring it up to date with"
        return ValueError(
            f"{self.workdir}: stage {stage!r} is stale: {state.reason}; {action} {fix} "
            "(later stages follow), or use a new --workdir."
        )

    def run(self, stages: tuple[str, ...] = STAGES, force: bool = False) -> dict[str, dict[str, Any]]:
        """Run `stages` in order, reusing completed ones whose options and inputs are unchanged.

        A completed stage made with other options is refused unless `force`; one built on an earlier stage
        that was recomputed since is recomputed; an earlier stage not asked for must be fresh. Nothing is
        written before every check has passed.
        """
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; stages are {STAGES}.")
        reports = {s: self.report(s) for s in STAGES if self.done(s)}
        stored = self.workdir / "pipeline.json"
        stored_config = PipelineConfig.from_dict(json.loads(stored.read_text())).to_dict() if stored.is_file() else None
        adopted = adopt_legacy_reports(reports, stored_config, str(self.workdir))
        plan = self._plan(stages, force, reports)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stage in adopted:
            self.report_path(stage).write_text(json.dumps(reports[stage], indent=2, default=float) + "\n")
        stored.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        results = {}
        for stage in stages_in_order(stages):
            if plan[stage] == "reuse":
                results[stage] = reports[stage]
                continue
            if stage == "extract" and plan[stage] == "recompute":
                shutil.rmtree(self.workdir / "features", ignore_errors=True)  # else the cache resumes the old draws
            if stage == "train" and plan[stage] == "recompute":
                remove_rounds(self.workdir)  # else the rounds resume from the old heads
            self._started_path(stage).write_text(json.dumps(self._fingerprint(stage)) + "\n")
            results[stage] = getattr(self, stage)()
        return results

    def _plan(self, stages: tuple[str, ...], force: bool, reports: dict[str, dict[str, Any]]) -> dict[str, str]:
        """For each asked stage: reuse | compute (none yet) | recompute (replace); raise for a stale one."""
        plan: dict[str, str] = {}
        upstream_recomputed = False
        last = max(STAGES.index(s) for s in stages) if stages else -1
        for stage in STAGES[: last + 1]:
            state = self._freshness(stage, reports)
            if stage not in stages:
                if upstream_recomputed or state.status == "inputs":
                    raise self._stale(
                        stage, Freshness("inputs", state.reason or "an earlier stage is recomputed"), False
                    )
                if state.status == "missing":
                    raise FileNotFoundError(
                        f"stage {stage!r} has not completed in {self.workdir}; run `vsteer {stage}` first."
                    )
                if state.status != "fresh":
                    raise self._stale(stage, state, True)
                continue
            if state.status == "missing":
                plan[stage] = "compute"
                self._check_unfinished(stage, force)
            elif force or upstream_recomputed or state.status == "inputs":
                plan[stage] = "recompute"
            elif state.status == "fresh":
                plan[stage] = "reuse"
            else:
                raise self._stale(stage, state, True)
            upstream_recomputed = upstream_recomputed or plan[stage] != "reuse"
        return plan

    def _check_unfinished(self, stage: str, force: bool) -> None:
        """Extraction resumes an unfinished feature cache, and training unfinished on-policy rounds, only
        if the same options (and, for rounds, the same earlier stages) started them."""
        if stage == "train":
            from vsteer_hf.train.rounds import check_unfinished_rounds

            return check_unfinished_rounds(self, force)
        if stage != "extract" or not (self.workdir / "features").exists():
            return
        started = self._started_path(stage)
        record = json.loads(started.read_text()) if started.is_file() else None
        options = stage_options(self.config.to_dict(), stage)
        if record is not None and record["options"] == options:
            return
        if force:
            shutil.rmtree(self.workdir / "features")
            return
        why = "with other options" if record is not None else "by an unrecorded run"
        raise ValueError(
            f"{self.workdir}: features/ holds an unfinished extraction started {why}; discard it with "
            f"`vsteer extract --workdir {self.workdir} --force`, or use a new --workdir."
        )

    # ------------------------------------------------------------------ stages
    def extract(self) -> dict[str, Any]:
        from vsteer_hf.backbones import load_backbone
        from vsteer_hf.eval.prompts import load_prompts, split_of
        from vsteer_hf.train.extract import extract_features

        cfg = self.config
        model, tokenizer = load_backbone(cfg.backbone, dtype=cfg.dtype, device=self.device, progress=self.progress)
        prompts = []
        for split in ("train", "validation", "test"):
            prompts += load_prompts(cfg.prompts, split=split, limit=cfg.limit)
        start = time.perf_counter()
        settings = {
            "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size,
            "chat": cfg.chat,
            "top_p": cfg.top_p,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
            "backbone": cfg.backbone,
            "progress": self.progress,
        }
        folder = self.workdir / "features"
        cache = extract_features(
            model, tokenizer, prompts, folder, samples_per_prompt=cfg.samples_per_prompt, **settings
        )
        extra = (cfg.train_samples_per_prompt or cfg.samples_per_prompt) - cfg.samples_per_prompt
        if extra:  # a second pass over the train prompts, sample indices after the first pass's
            train_prompts = [p for p in prompts if split_of(p.text) == "train"]
            cache = extract_features(
                model, tokenizer, train_prompts, folder, samples_per_prompt=extra, first_sample=cfg.samples_per_prompt,
                **settings,
            )
        seconds = time.perf_counter() - start
        tokens = int(sum(cache.lengths))
        return self._finish(
            "extract",
            {
                "sequences": len(cache),
                "tokens": tokens,
                "splits": cache.splits,
                "seconds": round(seconds, 1),
                "prompts": len(prompts),
            },
        )

    def label(self) -> dict[str, Any]:
        from vsteer_hf.eval.judges import get_judge
        from vsteer_hf.train.extract import label_cache
        from vsteer_hf.train.features import FeatureCache

        cache = FeatureCache(self.workdir / "features")
        counts = label_cache(cache, get_judge(self.config.judge), threshold=self.config.judge_threshold)
        cache = FeatureCache(self.workdir / "features")
        per_split = {}
        for split in cache.splits:
            labels = [lab for lab in cache.labels(cache.split(split)) if lab is not None]
            per_split[split] = {"n": len(labels), "positives": int(sum(labels))}
        return self._finish("label", {**counts, "judge": self.config.judge, "per_split": per_split})

    def train(self) -> dict[str, Any]:
        from vsteer_hf.train.features import FeatureCache

        if self.config.rounds > 1:
            from vsteer_hf.train.rounds import run_rounds

            return self._finish("train", run_rounds(self))
        return self._finish("train", self.train_head(FeatureCache(self.workdir / "features"), self.workdir / "head"))

    def _fit(self, cache: Any, config: TrainConfig | None = None) -> Any:
        """A `TrainResult`: the recipe's head (or one trained by `config`) on `cache`'s train split."""
        from vsteer_hf.train.trainer import train_value_head

        targets = self._token_targets(cache)
        return train_value_head(cache, config or self.config.train, progress=self.progress, token_targets=targets)

    def train_head(self, cache: Any, folder: Path) -> dict[str, Any]:
        """Train a head on `cache` (a feature cache, or the union of the rounds'), save it to `folder`."""
        result = self._fit(cache)
        head = result.head
        head.card.training.update(
            {
                "prompts": self.config.prompts,
                "judge": self.config.judge,
                "recipe": self.config.to_dict(),
                "splits": _split_record(cache),
            }
        )
        head.save_pretrained(folder)
        return {
            "history": result.history,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "val_auroc": result.val_auroc,
            "val_auroc_per_position": result.val_auroc_per_position,
            "class_balance": result.class_balance,
        }

    def _token_targets(self, cache: Any) -> dict[int, np.ndarray] | None:
        """Per-token targets for the train and validation splits (None: the sequence labels)."""
        if self.config.targets == "label":
            return None
        from vsteer_hf.backbones import load_tokenizer
        from vsteer_hf.eval.judges import get_judge
        from vsteer_hf.train.targets import token_targets

        tokenizer = load_tokenizer(self.config.backbone, progress=self.progress)
        return token_targets(
            self.config.targets, cache, get_judge(self.config.judge), tokenizer,
            judge_threshold=self.config.judge_threshold,
        )

    def calibrate(self) -> dict[str, Any]:
        from vsteer_hf.head import ValueHead
        from vsteer_hf.train.features import FeatureCache

        cache = FeatureCache(self.workdir / "features")
        head = ValueHead.from_pretrained(self.workdir / "head")
        say = (lambda line: print(line, flush=True)) if self.progress else None
        # the fold heads stand in for the final head, so they train for the epochs it kept: left to early-stop
        # on less data, some keep an earlier epoch, score safe text higher and make high-α thresholds strict
        folds = self.config.calibration_folds
        kept = self.report("train")["best_epoch"] + 1 if folds else None
        fold_config = replace(self.config.train, exact_epochs=kept)
        report = calibrate_head(
            head, cache, self.config.alphas, folds, lambda view: self._fit(view, fold_config).head, say
        )
        if folds:
            report["fold_head_epochs"] = head.card.calibration["fold_head_epochs"] = kept
        head.save_pretrained(self.workdir / "head")
        return self._finish("calibrate", report)

    def sweep(self) -> dict[str, Any]:
        from vsteer_hf import ValueSteerConfig, enable_value_steer
        from vsteer_hf.backbones import load_backbone
        from vsteer_hf.eval.judges import get_judge
        from vsteer_hf.eval.prompts import load_prompts
        from vsteer_hf.eval.runner import GenerationSettings, generate_method, summarize
        from vsteer_hf.head import ValueHead

        cfg = self.config
        head = ValueHead.from_pretrained(self.workdir / "head")
        model, tokenizer = load_backbone(cfg.backbone, dtype=cfg.dtype, device=self.device, progress=self.progress)
        model = enable_value_steer(model)
        prompts = load_prompts(cfg.prompts, split="validation", limit=cfg.limit)
        settings = GenerationSettings(
            samples_per_prompt=cfg.sweep_samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            top_p=cfg.top_p,
            temperature=cfg.temperature,
            batch_size=cfg.batch_size,
            seed=cfg.seed + 1,
            chat=cfg.chat,
        )
        judge = get_judge(cfg.judge)
        rows = []
        base = summarize(
            generate_method("base", model, tokenizer, prompts, settings, progress=self.progress),
            judge,
            cfg.judge_threshold,
            ppl_model=model,
        )
        rows.append({"alpha": None, "threshold": None, **base.as_dict()})
        for alpha in cfg.sweep_alphas:
            threshold = head.card.threshold_for_alpha(alpha)
            steer = ValueSteerConfig(head=head, threshold=threshold, num_candidates=cfg.num_candidates)
            run = generate_method(f"vfd@{alpha}", model, tokenizer, prompts, settings, steer, progress=self.progress)
            rows.append(
                {
                    "alpha": alpha,
                    "threshold": threshold,
                    **summarize(run, judge, cfg.judge_threshold, ppl_model=model).as_dict(),
                }
            )
        base_rate = base.toxic_rate.value
        halving = [r for r in rows[1:] if r["toxic_rate"]["value"] <= base_rate / 2]
        chosen = (
            max(halving, key=lambda r: r["threshold"])
            if halving
            else min(rows[1:], key=lambda r: r["toxic_rate"]["value"])
        )
        head.card.threshold = chosen["threshold"]
        head.card.training["threshold_sweep"] = {
            "split": "validation",
            "chosen_alpha": chosen["alpha"],
            "halves_base_rate": bool(halving),
            "rows": [
                {k: r[k] for k in ("alpha", "threshold", "toxic_rate", "perplexity", "interventions_per_token")}
                for r in rows
            ],
        }
        head.save_pretrained(self.workdir / "head")
        return self._finish(
            "sweep",
            {
                "rows": rows,
                "recommended_threshold": chosen["threshold"],
                "recommended_alpha": chosen["alpha"],
                "halves_base_rate": bool(halving),
            },
        )


def _split_record(cache: Any) -> dict[str, Any]:
    """How prompts were split, and how many generations each split holds (for the head card)."""
    from vsteer_hf.eval.prompts import SPLIT_FRACTIONS, SPLIT_SALT

    return {
        "method": f"sha256('{SPLIT_SALT}' + normalised prompt text) -> uniform -> {SPLIT_FRACTIONS}",
        "generations": cache.splits,
        "prompts": {split: len({cache.records[i]["prompt_id"] for i in cache.split(split)}) for split in cache.splits},
    }
