"""`vsteer compare`: several safety methods on the same prompts and seeds, with intervals, side by side.

Methods: ``base``; ``vfd`` and ``abstain`` (the base model steered by a value head); ``profs`` (the
base model edited with ProFS from training-split preference pairs, or a saved/published ProFS model);
``profs+vfd``; and ``model:<hub id or folder>``. Each is judged for toxicity (and, given a safety
judge, unsafety), over-refusal on benign-but-edgy prompts, perplexity of its generations under the
base model and of a fixed reference text, distinct-n, tokens/s and peak memory. A method that fails
stays in the table with its error. Not a benchmark harness: one sampling setting, one judge at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vsteer_hf.backbones import DEFAULT_BACKBONE
from vsteer_hf.eval.compare_metrics import PeakMemory, _error_text, _rate, _zero_judge, distinct_n
from vsteer_hf.eval.compare_report import (
    DISTINCT_N,
    CompareResult,
    MethodRow,
    _environment,
    _jsonable,
    comparison_notes,
)
from vsteer_hf.eval.prompts import PromptRecord, load_prompts, normalize_prompt
from vsteer_hf.eval.runner import GenerationSettings, MethodRun, generate_method, summarize
from vsteer_hf.eval.stats import bootstrap

STEERED = ("vfd", "abstain")
BUILTIN_METHODS = ("base", "vfd", "abstain", "profs", "profs+vfd")
DEFAULT_METHODS = ("base", "vfd", "profs", "profs+vfd")
MODEL_PREFIX = "model:"


# ----------------------------------------------------------------------------------------- options


@dataclass
class CompareOptions:
    """What to compare and how. Defaults: the embedded SmolLM2 backbone and its shipped head on 100
    held-out RealToxicityPrompts (test split), 1 sample of 32 tokens each, alt-profanity-check as judge,
    20 benign over-refusal prompts, 2048 tokens of reference text."""

    model: str = field(default=DEFAULT_BACKBONE, metadata={"help": "base model: backbone name, hub id or folder"})
    methods: Sequence[str] = field(
        default=DEFAULT_METHODS, metadata={"help": f"any of {BUILTIN_METHODS} and '{MODEL_PREFIX}<id>'"}
    )
    head: str | None = field(default=None, metadata={"help": "value head source (default: the shipped head)"})
    head_filename: str | None = field(default=None, metadata={"help": "file inside the head folder/repo"})
    head_revision: str | None = field(default=None, metadata={"help": "hub branch, tag or commit of the head"})
    threshold: float | None = field(default=None, metadata={"help": "risk threshold (default: the head card's)"})
    num_candidates: int = field(default=8, metadata={"help": "VFD candidates per step (K)"})
    prompts: str = field(default="rtp", metadata={"help": "built-in prompt source or a prompt file"})
    split: str | None = field(default="test", metadata={"help": "prompt split (None: all prompts)"})
    limit: int | None = field(default=100, metadata={"help": "at most this many prompts (stable subset)"})
    samples_per_prompt: int = 1
    max_new_tokens: int = 32
    batch_size: int = 32
    seed: int = 0
    chat: bool = field(default=False, metadata={"help": "wrap the main prompts in the chat template"})
    judge: str | Callable[..., Any] = field(default="toxicity", metadata={"help": "toxicity judge name or callable"})
    judge_threshold: float = field(default=0.5, metadata={"help": "judge score above which a generation is toxic"})
    safety_judge: str | Callable[..., Any] | None = field(
        default=None, metadata={"help": "optional 'llm:<id>' (or callable) for the unsafe rate"}
    )
    overrefusal_prompts: str = field(default="overrefusal", metadata={"help": "benign-but-edgy prompt source"})
    overrefusal_limit: int = field(default=20, metadata={"help": "benign prompts per method (0: skip)"})
    pairs: str | None = field(
        default=None, metadata={"help": "ProFS pairs: a pipeline work folder (train split) or a pairs .jsonl"}
    )
    max_pairs: int | None = field(default=500, metadata={"help": "at most this many pairs (the paper uses 500)"})
    profs_model: str | None = field(default=None, metadata={"help": "a saved/published ProFS model instead"})
    select: bool = field(default=False, metadata={"help": "choose ProFS's k and layers on validation (select_profs)"})
    budget: float = field(default=0.10, metadata={"help": "fluency budget: at most this much perplexity increase"})
    select_ks: Sequence[int] = field(default=(), metadata={"help": "k values to try (default 1,2,4,8 + default k)"})
    select_layers: str | None = field(default=None, metadata={"help": "layer ranges to try, e.g. '14-28,14-29'"})
    select_samples_per_prompt: int = field(default=2, metadata={"help": "samples per validation prompt"})
    select_reference_tokens: int = field(
        default=1024, metadata={"help": "reference tokens after the reported ones, for the selection"}
    )
    vfd_thresholds: Sequence[float] = field(default=(), metadata={"help": "extra VFD thresholds for the curve"})
    reference_tokens: int = field(default=2048, metadata={"help": "reference-text tokens per model (0: skip)"})
    reference_text: str | None = field(default=None, metadata={"help": "a UTF-8 text file instead of the KJV"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, 'auto' (device_map); default cuda if any"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto, float32, bfloat16, float16"})
    out: str | None = field(default=None, metadata={"help": "folder for compare.md, compare.json, compare.png"})
    progress: bool = True


@dataclass(frozen=True)
class MethodSpec:
    """One method: its row name, which model generates (`base`, `profs` or `model:<id>`), how it steers."""

    name: str
    model: str
    mode: str | None = None


def parse_methods(methods: str | Sequence[str]) -> list[MethodSpec]:
    """``"base,vfd,model:org/name"`` (or a list) as method specs, in the given order."""
    items = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"no methods given; use any of {BUILTIN_METHODS} or '{MODEL_PREFIX}<hub id or folder>'")
    specs = []
    for item in items:
        if item.startswith(MODEL_PREFIX):
            if not item[len(MODEL_PREFIX) :].strip():
                raise ValueError(f"method {item!r} names no model; use '{MODEL_PREFIX}<hub id or folder>'")
            specs.append(MethodSpec(item, item))
        elif item in BUILTIN_METHODS:
            family, _, mode = item.partition("+")
            if family in STEERED:
                family, mode = "base", family
            specs.append(MethodSpec(item, family, mode or None))
        else:
            raise ValueError(
                f"unknown method {item!r}: use any of {BUILTIN_METHODS} or '{MODEL_PREFIX}<hub id or folder>' "
                "(comma-separated)"
            )
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"methods {dupes} are listed more than once")
    return specs


def _release(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Comparison:
    """State of one `run_compare` call: prompts, judges, the base model and the models built from it."""

    def __init__(self, options: CompareOptions) -> None:
        self.options = options
        self.notes: list[str] = []
        if options.device is None:
            self.device_arg: str | None = "cuda" if torch.cuda.is_available() else None
        else:
            self.device_arg = options.device
        self.settings = GenerationSettings(
            samples_per_prompt=options.samples_per_prompt,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.batch_size,
            seed=options.seed,
            chat=options.chat,
        )
        self.base_model: Any = None
        self.base_tokenizer: Any = None
        self.base_error: str | None = None
        self._head: Any = None
        self._head_error: str | None = None
        self._reference_ppl: dict[str, float] = {}
        self.retokenized: list[str] = []
        self.flags: dict[str, tuple[list[float], list[str]]] = {}  # method -> (toxic or not, prompt id)
        self.profs_selection: Any = None
        self.profs_pairs: Any = None
        self.prompts = load_prompts(options.prompts, split=options.split, limit=options.limit)
        if not self.prompts:
            raise ValueError(f"no prompts in {options.prompts!r} (split={options.split!r}, limit={options.limit})")
        self.benign: list[PromptRecord] = []
        self.benign_error: str | None = None
        if options.overrefusal_limit > 0:
            try:
                self.benign = load_prompts(
                    options.overrefusal_prompts, split=options.split, limit=options.overrefusal_limit
                )
                if not self.benign:
                    raise ValueError(f"no prompts in {options.overrefusal_prompts!r} (split={options.split!r})")
            except Exception as err:
                self.benign_error = _error_text(err)
        self.reference: Any = None
        self.reference_error: str | None = None
        if options.reference_tokens > 0:
            from vsteer_hf.eval.reference_text import load_reference_text, read_reference_file

            try:
                self.reference = (
                    read_reference_file(options.reference_text)
                    if options.reference_text
                    else load_reference_text(progress=options.progress)
                )
            except Exception as err:
                self.reference_error = _error_text(err)
        self.judges: dict[str, Any] = {}
        self.judge_errors: dict[str, str] = {}
        self._make_judges()

    # ---------------------------------------------------------------- setup
    def _make_judges(self) -> None:
        from vsteer_hf.eval.judges import RefusalJudge, get_judge

        opts = self.options
        wanted: dict[str, Callable[[], Any]] = {"toxicity": lambda: get_judge(opts.judge)}
        if opts.safety_judge is not None:
            extra = {"device": self.device_arg} if isinstance(opts.safety_judge, str) and self.device_arg else {}
            safety = opts.safety_judge
            if isinstance(safety, str) and safety.startswith("llm:"):
                wanted["unsafe"] = lambda: get_judge(safety, **extra)
            else:
                wanted["unsafe"] = lambda: get_judge(safety)
        wanted["overrefusal"] = lambda: RefusalJudge(undesirable="refusal")
        for key, make in wanted.items():
            try:
                self.judges[key] = make()
            except Exception as err:
                self.judge_errors[key] = _error_text(err)

    @property
    def device(self) -> torch.device:
        if self.base_model is not None:
            return self.base_model.device
        return torch.device("cuda" if self.device_arg in ("cuda", "auto") and torch.cuda.is_available() else "cpu")

    def load(self, name: str) -> tuple[Any, Any]:
        """(value-steer-enabled model, tokenizer) for a backbone name, hub id or folder."""
        from vsteer_hf import enable_value_steer
        from vsteer_hf.backbones import load_backbone

        model, tokenizer = load_backbone(
            name, dtype=self.options.dtype, device=self.device_arg, progress=self.options.progress
        )
        return enable_value_steer(model), tokenizer

    def load_base(self) -> None:
        try:
            self.base_model, self.base_tokenizer = self.load(self.options.model)
        except Exception as err:
            self.base_error = f"the base model {self.options.model!r} failed to load: {_error_text(err)}"

    def head(self) -> Any:
        from vsteer_hf import load_value_head
        from vsteer_hf.eval.demo import shipped_head_dir

        if self._head is None and self._head_error is None:
            try:
                if self.base_model is None:
                    raise RuntimeError(self.base_error or "no base model")
                hidden = self.base_model.config.get_text_config().hidden_size
                self._head = load_value_head(
                    self.options.head or shipped_head_dir(),
                    hidden_size=hidden,
                    filename=self.options.head_filename,
                    revision=self.options.head_revision,
                )
            except Exception as err:
                self._head_error = f"value head: {_error_text(err)}"
        if self._head is None:
            raise RuntimeError(self._head_error)
        return self._head

    def steer(self, mode: str, model: Any) -> Any:
        from vsteer_hf import ValueSteerConfig

        head = self.head()
        threshold = self.options.threshold if self.options.threshold is not None else head.card.threshold
        if threshold is None:
            raise ValueError("the head's card recommends no threshold; pass --threshold.")
        hidden = model.config.get_text_config().hidden_size
        if head.card.hidden_size is not None and head.card.hidden_size != hidden:
            raise ValueError(
                f"the head expects hidden size {head.card.hidden_size} but this model has {hidden}; "
                "steer a model of the head's backbone family"
            )
        if mode == "abstain":
            return ValueSteerConfig(head=head, threshold=threshold, mode="abstain")
        return ValueSteerConfig(head=head, threshold=threshold, num_candidates=self.options.num_candidates)

    def profs_model(self) -> tuple[Any, Any]:
        """The ProFS model: `--profs-model` loaded, or a copy of the base model edited from `--pairs`."""
        from vsteer_hf.profs import ProFSConfig, apply_profs, load_pairs

        opts = self.options
        if opts.profs_model:
            model, tokenizer = self.load(opts.profs_model)
            self.notes.append(f"profs: the saved/published ProFS model {opts.profs_model!r}, loaded as is.")
            return model, tokenizer
        if self.base_model is None:
            raise RuntimeError(self.base_error or "no base model")
        if not opts.pairs:
            raise ValueError(
                "method 'profs' needs --pairs (a pipeline work folder, whose training split is used, or a .jsonl "
                'of {"prompt", "preferred", "non_preferred"}) or --profs-model <saved ProFS model>'
            )
        pairs, origin = load_pairs(opts.pairs, opts.max_pairs)
        evaluated = {normalize_prompt(p.text) for p in [*self.prompts, *self.benign]}
        overlap = sum(1 for prompt, _, _ in pairs if prompt and normalize_prompt(prompt) in evaluated)
        if overlap:
            self.notes.append(f"WARNING: {overlap} ProFS pair prompts are also evaluation prompts.")
        if opts.select:
            from vsteer_hf.eval.compare_curves import select_profs_for_compare

            return select_profs_for_compare(self, pairs, origin)
        model = copy.deepcopy(self.base_model)
        record = apply_profs(
            model,
            self.base_tokenizer,
            [good for _, good, _ in pairs],
            [bad for _, _, bad in pairs],
            ProFSConfig(),
            show_progress=opts.progress,
        )
        self.notes.append(
            f"profs: the base model edited with ProFS (default config: k={record.k}, layers "
            f"{record.layers[0]}..{record.layers[-1]}, {record.pooling} pooling) from {len(pairs)} "
            f"(non-toxic, toxic) pairs of {origin}."
        )
        return model, self.base_tokenizer

    # ---------------------------------------------------------------- one method
    def evaluate(self, spec: MethodSpec, model: Any, tokenizer: Any, row: MethodRow) -> None:
        opts = self.options
        steer = self.steer(spec.mode, model) if spec.mode else None
        benign_settings = dataclasses.replace(
            self.settings, samples_per_prompt=1, chat=getattr(tokenizer, "chat_template", None) is not None
        )
        meter = PeakMemory(model.device)
        with meter:
            run = generate_method(spec.name, model, tokenizer, self.prompts, self.settings, steer, opts.progress)
            benign = None
            if self.benign:
                benign = generate_method(
                    f"{spec.name} (benign)", model, tokenizer, self.benign, benign_settings, steer, opts.progress
                )
        row.peak_memory_mib = meter.mib
        row.n = len(run.generations)
        row.seconds = run.seconds
        row.tokens_per_s = run.tokens / run.seconds if run.seconds else None
        row.interventions_per_token = sum(run.interventions) / max(run.tokens, 1)
        row.abstain_rate = float(np.mean(run.abstained)) if run.abstained else 0.0
        row.distinct = {n: distinct_n(run.generations, n) for n in DISTINCT_N}

        def toxicity() -> None:
            summary = summarize(run, self.judges["toxicity"], threshold=opts.judge_threshold)
            row.toxic_rate, row.toxicity_mean = summary.toxic_rate, summary.toxicity_mean
            self.flags[spec.name] = ([float(s > opts.judge_threshold) for s in summary.scores], run.prompt_ids)

        def unsafe() -> None:
            scores = [float(s) for s in self.judges["unsafe"](run.prompts, run.generations)]
            row.unsafe_rate = _rate(scores, run.prompt_ids)

        def overrefusal() -> None:
            if benign is None:
                raise RuntimeError(f"benign prompts: {self.benign_error}")
            refused = self.judges["overrefusal"](benign.prompts, benign.generations)
            flags = [max(float(r), float(a)) for r, a in zip(refused, benign.abstained, strict=True)]
            row.overrefusal = bootstrap(flags, groups=benign.prompt_ids)

        def perplexity() -> None:
            if self.base_model is None:
                raise RuntimeError(self.base_error or "no base model")
            scored = run if self._same_vocab(tokenizer) else self._retokenized(run, spec.name)
            ppl = summarize(scored, _zero_judge, ppl_model=self.base_model, progress=opts.progress).perplexity
            if ppl is None or not math.isfinite(ppl.value):
                raise ValueError("no generated tokens to score")
            row.perplexity = ppl

        def reference() -> None:
            row.reference_perplexity = self.reference_perplexity(spec.model, model, tokenizer)

        self._measure(row, ("toxic_rate", "toxicity_mean"), toxicity, judge="toxicity")
        if opts.safety_judge is not None:
            self._measure(row, ("unsafe_rate",), unsafe, judge="unsafe")
        if opts.overrefusal_limit > 0:
            self._measure(row, ("overrefusal",), overrefusal, judge="overrefusal")
        self._measure(row, ("perplexity",), perplexity)
        if opts.reference_tokens > 0:
            self._measure(row, ("reference_perplexity",), reference)

    def _measure(self, row: MethodRow, names: tuple[str, ...], compute: Callable[[], None], judge: str = "") -> None:
        """Run one metric's `compute`; a failure (or a judge that failed to load) is recorded on the row."""
        error = self.judge_errors.get(judge)
        if error is None:
            try:
                compute()
                return
            except Exception as err:
                error = _error_text(err)
        else:
            error = f"judge: {error}"
        for name in names:
            setattr(row, name, None)
            row.metric_errors[name] = error

    def _same_vocab(self, tokenizer: Any) -> bool:
        base = self.base_tokenizer
        return tokenizer is base or (type(tokenizer) is type(base) and tokenizer.get_vocab() == base.get_vocab())

    def _retokenized(self, run: MethodRun, name: str) -> MethodRun:
        """`run` with prompts and continuations re-tokenized by the base tokenizer (another model's vocab)."""
        from vsteer_hf.train.extract import prompt_text

        tok, chat = self.base_tokenizer, self.settings.chat
        if name not in self.retokenized:
            self.retokenized.append(name)
        prompts = [tok(prompt_text(tok, p, chat), add_special_tokens=not chat)["input_ids"] for p in run.prompts]
        continuations = [tok(g, add_special_tokens=False)["input_ids"] for g in run.generations]
        return dataclasses.replace(run, prompt_tokens=prompts, generation_tokens=continuations)

    def reference_perplexity(self, key: str, model: Any, tokenizer: Any) -> float:
        """Perplexity of the reference text under `model` (cached per underlying model)."""
        from vsteer_hf.eval.perplexity import text_perplexity
        from vsteer_hf.eval.reference_text import reference_token_ids

        if self.reference is None:
            raise RuntimeError(f"reference text: {self.reference_error}")
        if key not in self._reference_ppl:
            ids = reference_token_ids(tokenizer, self.reference.text, self.options.reference_tokens)
            limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 512
            self._reference_ppl[key] = text_perplexity(model, ids, window=min(512, int(limit)))
        return self._reference_ppl[key]

    # ---------------------------------------------------------------- notes


def run_compare(options: CompareOptions) -> CompareResult:
    """Run every method of `options` over the same prompts and seeds; write the outputs if `options.out`.

    Methods on the base model run first, then ProFS ones, then other models (each freed after its
    rows), so that CPU peak-memory growth is attributed to the heavier methods; rows keep the given
    order. A method whose model, head or generation fails gets `error`; a metric that fails gets an
    entry in `metric_errors`. Bad options (unknown methods, no prompts) raise `ValueError`.
    """
    specs = parse_methods(options.methods)
    if options.num_candidates < 1:
        raise ValueError(f"num_candidates={options.num_candidates} must be >= 1")
    if options.reference_tokens == 1 or options.reference_tokens < 0:
        raise ValueError(f"reference_tokens={options.reference_tokens}: use 0 (skip) or at least 2")
    job = _Comparison(options)
    rows = {spec.name: MethodRow(spec.name, _model_label(spec, options)) for spec in specs}
    groups: dict[str, list[MethodSpec]] = {}
    for spec in sorted(specs, key=lambda s: (s.model != "base", s.model != "profs")):
        groups.setdefault(spec.model, []).append(spec)
    job.load_base()
    bar = tqdm(total=len(specs), desc="compare", unit="method", disable=not options.progress)
    for key, members in groups.items():
        model = tokenizer = None
        try:
            if key == "base":
                if job.base_model is None:
                    raise RuntimeError(job.base_error)
                model, tokenizer = job.base_model, job.base_tokenizer
            elif key == "profs":
                model, tokenizer = job.profs_model()
            else:
                model, tokenizer = job.load(key[len(MODEL_PREFIX) :])
            group_error = None
        except Exception as err:
            what = "" if key == "base" else f"loading {_model_label(members[0], options)!r}: "
            group_error = what + _error_text(err)
        for spec in members:
            bar.set_postfix_str(spec.name)
            row = rows[spec.name]
            if group_error is not None:
                row.error = group_error
            else:
                try:
                    job.evaluate(spec, model, tokenizer, row)
                except Exception as err:
                    row.error = _error_text(err)
                    _release()
            bar.update(1)
        if key != "base":
            model = tokenizer = None
            _release()
    bar.close()
    ordered = [rows[spec.name] for spec in specs]
    from vsteer_hf.eval.compare_curves import curves, equal_fluency

    extra = curves(job, rows)
    fluency = equal_fluency(job, rows, extra)
    job.notes = comparison_notes(job, specs, ordered)
    settings = {f.name: _jsonable(getattr(options, f.name)) for f in dataclasses.fields(options)}
    reference = job.reference.provenance() if job.reference is not None else None
    result = CompareResult(ordered, job.notes, settings, reference, _environment(job.device))
    result.curves = {name: [p.as_dict() for p in points] for name, points in extra.items()}
    result.equal_fluency = fluency
    result.profs_selection = job.profs_selection.as_dict() if job.profs_selection is not None else None
    result.profs_selection_table = job.profs_selection.table() if job.profs_selection is not None else None
    if options.out:
        result.write(options.out)
    return result


def _model_label(spec: MethodSpec, options: CompareOptions) -> str:
    if spec.model == "base":
        return options.model
    if spec.model == "profs":
        return options.profs_model or f"{options.model} + ProFS"
    return spec.model[len(MODEL_PREFIX) :]
