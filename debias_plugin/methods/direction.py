"""`debias direction`: a bias direction (or LEACE eraser) per layer from paired sentences, written as a steering file
for lm-eval's `steered` model (and our `hf-steered-safe`), not as weights.

Each sentence's hidden state at a hookpoint is the mean of that module's output over the sentence's own tokens
(special tokens such as the prepended BOS excluded). From the two sides' states A, B (one row per pair):

- mean_difference: v = mean(A - B).
- pca (SentenceDebias, Liang et al. 2020): each pair centred on its own mean, the first principal component(s) of
  those centred states, i.e. the top right-singular vector(s) of D = A - B (uncentred). Signs point from B to A.
- leace (Belrose et al. 2023, `concept-erasure`): the eraser x -> x - L R (x - mu) fitted on A and B with the side as
  the concept label; after it the states' cross-covariance with the label is zero on the fitting data.

steer.pt holds exactly lm-eval's steered format ({hookpoint: {steering_vector, steering_coefficient, action, bias,
head_index}}; `clamp` sets the projection on the direction to the coefficient, 0 removes it; `add` adds coefficient
x vector). steer.safetensors holds the same entries as tensors plus a JSON header, and also what that format cannot
hold: rank-k erasers (tensors L, R and optional mu per hookpoint). A rank-k projection is L = U, R = U^T.

Folding (--fold): the eraser is affine, and folding it into the next linear layer is exact only where that layer is
the only consumer of the erased vector and reads it before any nonlinearity or normalisation. A residual-stream
hookpoint (`layers.N`) of a pre-norm transformer feeds the residual sum and every later block's LayerNorm/RMSNorm, so
folding there is not exact in general. The final norm's output is read by the LM head alone: erasing it and folding
W <- W (I - L R) into the head is exact (untying the head from the input embeddings where they were tied). The
affine part's constant W L R mu would need a head bias that causal-LM classes lack, so --fold takes the linear
eraser (--no-affine); its cross-covariance with the label is zero as well (a constant does not change covariances).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from debias_plugin.errors import DebiasError
from debias_plugin.options import InputPathOrName, MadeStage, Options

FINAL = "final"  # the hookpoint whose output is the LM head's input (the final norm)
STEER_PT, STEER_SAFETENSORS = "steer.pt", "steer.safetensors"
FORMAT = "debias_plugin.steering/1"
POOLING = "mean over the sentence's own tokens (special tokens excluded)"


class DirectionOptions(Options):
    """What `debias direction` estimates, from which pairs, at which layers (the model and output are arguments)."""

    pairs: InputPathOrName = Field(
        "winogender", description="winogender | stereoset | bbq (from $DEBIAS_DATA_DIR), a WinoGender folder, a pair "
                                  "CSV/TSV (advantaged,disadvantaged) or StereoSet .json/.jsonl; with --swap-domain a "
                                  "text file (e.g. a RedditBias comments CSV). Never CrowS-Pairs, the evaluation set.")
    groups: list[str] = Field([], description="Keep pairs of this group (StereoSet domain, WinoGender occupation, BBQ "
                                              "category); repeatable.", json_schema_extra={"flag": "--group"})
    swap_domain: str | None = Field(
        None, description="Counterfactual pairs: each text of --pairs with every attribute word of this domain of "
                          "bias_attribute_words.json (gender, race, religion) set to its first form (side A) and to "
                          "its second form (side B); texts without such a word are skipped.")
    text_column: str = Field("comment", description="The text column of --pairs with --swap-domain (CSV/JSONL).")
    layers: list[str] = Field(
        description="Hookpoints, comma-separated: block numbers (the output of model.base_model's block N, e.g. "
                    "`layers.N`) and/or 'final' (the final norm's output, the LM head's input).",
        json_schema_extra={"separator": ","})
    estimator: Literal["mean_difference", "pca", "leace"] = Field(
        "mean_difference", description="mean_difference: mean(A - B); pca: SentenceDebias's first principal "
                                       "component(s) of the pair differences; leace: LEACE eraser (concept-erasure).")
    action: Literal["clamp", "add"] = Field(
        "clamp", description="clamp: set the projection on the direction to --coefficient (0 removes it); add: add "
                             "--coefficient x the direction to every position.")
    coefficient: float = Field(0.0, description="clamp: the projection's value; add: the multiple of the direction "
                                                "(mean_difference: negative moves side A's states toward side B's).")
    center: bool = Field(False, description="clamp around the mean of all states (lm-eval's `bias` field) instead "
                                            "of the origin.")
    rank: int = Field(1, ge=1, description="pca: principal components removed; above 1 only steer.safetensors holds "
                                           "them (a rank-k projection for hf-steered-safe).")
    affine: bool = Field(True, description="leace: the affine eraser x - LR(x - mu) (least-squares optimal); "
                                           "--no-affine: the linear x - LRx (required by --fold).")
    fold: bool = Field(False, description="leace at 'final': fold the eraser into the LM head and write a model "
                                          "folder instead of a steering file (exact there; see the module doc).")
    max_pairs: int | None = Field(None, ge=1, description="Use the first N pairs only.")
    max_length: int = Field(128, ge=2, description="Tokens per sentence (longer ones are truncated).")
    batch_size: int = Field(16, ge=1, description="Sentences per forward pass.")
    device: str | None = Field(None, description="cpu, cuda:0, ... (default: cuda:0 when available).")

    @field_validator("pairs")
    @classmethod
    def _not_crows(cls, value: str) -> str:
        if value.strip().lower() in ("crows", "crows_pairs", "crows-pairs"):
            raise ValueError("CrowS-Pairs is the evaluation set: a direction estimated on it would be scored on its "
                             "own sentences. Use winogender, stereoset, bbq or RedditBias swaps (--swap-domain)")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one hookpoint (a block number or 'final')")
        for item in value:
            if item != FINAL and not item.isdigit():
                raise ValueError(f"'{item}' is neither a block number (0, 1, ...) nor '{FINAL}'")
        if len(set(value)) != len(value):
            raise ValueError("a hookpoint is named twice")
        return value

    @model_validator(mode="after")
    def _combination(self):
        if self.estimator == "leace":
            if self.action != "clamp" or self.coefficient != 0 or self.center or self.rank != 1:
                raise ValueError("leace erases (rank from the fit): action, coefficient, center and rank are for "
                                 "mean_difference and pca")
        elif not self.affine or self.fold:
            raise ValueError("affine and fold are options of the leace estimator")
        if self.fold and (self.layers != [FINAL] or self.affine):
            raise ValueError(f"fold is exact only for the LM head's input: layers '{FINAL}' alone, with the linear "
                             "eraser (affine false: the head has no bias for the affine constant)")
        if self.rank > 1 and (self.estimator != "pca" or self.action != "clamp" or self.coefficient != 0
                              or self.center):
            raise ValueError("rank above 1 is pca's removal of k components (clamp, coefficient 0, no center)")
        if self.action == "add" and self.center:
            raise ValueError("lm-eval's add action takes no bias: center is for clamp")
        return self


# -- pairs ------------------------------------------------------------------------------------------------------
def counterfactual_pairs(texts: list[str], word_groups: list[list[str]], origin: str) -> list:
    """(text with every attribute word in its first form, the same in its second form); unchanged texts dropped."""
    from debias_plugin.data.bias_pair import BiasPair

    to_side = [{}, {}]
    for group in word_groups:
        if len(group) >= 2:
            for word in group:
                for side in (0, 1):
                    to_side[side].setdefault(word.lower(), group[side])
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, to_side[0]), key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)

    def swapped(text: str, side: int) -> str:
        def one(match):
            word = to_side[side][match.group(0).lower()]
            return word[:1].upper() + word[1:] if match.group(0)[:1].isupper() else word
        return pattern.sub(one, text)

    pairs = []
    for number, text in enumerate(texts, start=1):
        a, b = swapped(text, 0), swapped(text, 1)
        if a != b:
            pairs.append(BiasPair(a, b, "", f"{origin}, text {number}"))
    return pairs


def read_pairs(opts: DirectionOptions) -> list:
    """The pairs the options name; CrowS-Pairs (by name, CrowS-style file, or a reused sentence) refused."""
    from debias_plugin.data.pairs import evaluation_overlap, load_pairs

    if opts.swap_domain:
        from debias_plugin.data.texts import load_texts
        from debias_plugin.data.words import load_attribute_words

        words = load_attribute_words()
        if opts.swap_domain not in words:
            raise DebiasError(f"--swap-domain {opts.swap_domain}: the attribute word list has the domains "
                              f"{', '.join(sorted(words))}.")
        texts = load_texts(opts.pairs, column=opts.text_column)
        pairs = counterfactual_pairs(texts, words[opts.swap_domain], str(Path(opts.pairs).expanduser()))
        if not pairs:
            raise DebiasError(f"--pairs {opts.pairs}: no text contains a {opts.swap_domain} attribute word to swap.")
    else:
        path = Path(opts.pairs).expanduser()
        if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
            header = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
            if "sent_more" in header and "advantaged" not in header:
                raise DebiasError(f"--pairs {path}: a CrowS-style file (sent_more, sent_less). CrowS-Pairs is the "
                                  "evaluation set; estimate directions on other pairs.")
        pairs = load_pairs(opts.pairs, opts.groups or None)
    if "CrowS-Pairs" in evaluation_overlap(pairs):
        raise DebiasError(f"--pairs {opts.pairs}: some pairs reuse CrowS-Pairs sentences, the evaluation set; "
                          "estimate directions on other pairs.")
    return pairs[: opts.max_pairs] if opts.max_pairs else pairs


def pair_files(pairs: list) -> dict[str, str]:
    """The files the pairs came from, by manifest role (their origins name them), plus the attribute word list."""
    files = sorted({pair.origin.rsplit(", ", 1)[0] for pair in pairs})
    roles = {"pairs": files[0]} if len(files) == 1 else {f"pairs {i}": f for i, f in enumerate(files, start=1)}
    if any(", text " in pair.origin for pair in pairs[:1]):
        from debias_plugin.data.words import ATTRIBUTE_WORDS_RELATIVE_PATH
        from debias_plugin.paths import data_file

        roles["attribute words"] = str(data_file(None, ATTRIBUTE_WORDS_RELATIVE_PATH, "Bias attribute words"))
    return roles


# -- hookpoints and hidden states -------------------------------------------------------------------------------
def block_list(model) -> str:
    """Name (under model.base_model) of the ModuleList holding the transformer blocks, e.g. `layers` or `h`."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.base_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name
    raise DebiasError(f"{type(model).__name__}: no list of {count} blocks under model.base_model to hook.")


def final_hookpoint(model, tokenizer) -> str:
    """The module under model.base_model whose output is the LM head's input (checked on a probe sentence)."""
    import torch

    blocks = block_list(model)
    names = [name for name, module in model.base_model.named_modules()
             if name and "norm" in type(module).__name__.lower() and not name.startswith(blocks + ".")]
    if names:
        seen = {}
        head = model.get_output_embeddings()
        handles = [head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("head", args[0]))]
        module = model.base_model.get_submodule(names[-1])
        handles.append(module.register_forward_hook(lambda _m, _a, out: seen.__setitem__("norm", out)))
        try:
            with torch.no_grad():
                model(**tokenizer("The nurse said hello.", return_tensors="pt").to(head.weight.device))
        finally:
            for handle in handles:
                handle.remove()
        if torch.equal(seen.get("head"), seen.get("norm")):
            return names[-1]
    raise DebiasError(f"{type(model).__name__}: no module under model.base_model whose output is the LM head's input "
                      f"(the final norm) was found; name block numbers in --layers instead of '{FINAL}'.")


def hookpoints(model, tokenizer, layers: list[str]) -> list[str]:
    """--layers as module names under model.base_model, the names lm-eval's steered model hooks."""
    blocks, count = block_list(model), model.config.num_hidden_layers
    names = []
    for item in layers:
        if item == FINAL:
            names.append(final_hookpoint(model, tokenizer))
        elif int(item) >= count:
            raise DebiasError(f"--layers {item}: the model has blocks 0 to {count - 1}.")
        else:
            names.append(f"{blocks}.{int(item)}")
    return names


def hidden_states(model, tokenizer, sentences: list[str], points: list[str], *, max_length: int, batch_size: int,
                  progress: bool = False) -> dict:
    """hookpoint -> float64 tensor [sentence, hidden]: each module output averaged over the sentence's own tokens."""
    import torch
    from tqdm.auto import tqdm

    from debias_plugin.methods import encode, pad, special_positions
    from debias_plugin.models import pad_id

    device = next(model.parameters()).device
    captured, rows = {}, {point: [] for point in points}

    def keep(point):
        def hook(_module, _args, output):
            captured[point] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [model.base_model.get_submodule(p).register_forward_hook(keep(p)) for p in points]
    try:
        with torch.no_grad():
            starts = range(0, len(sentences), batch_size)
            for start in tqdm(starts, desc="hidden states", unit="batch", leave=False, disable=not progress):
                encoded = [encode(tokenizer, s, "causal", max_length)[0] for s in sentences[start:start + batch_size]]
                ids = pad(encoded, pad_id(tokenizer)).to(device)
                attention = pad([[1] * len(e) for e in encoded], 0).to(device)
                own = pad([[not s for s in special_positions(tokenizer, e)] for e in encoded], 0).to(device)
                if not bool(own.any(-1).all()):
                    raise DebiasError("A sentence has no tokens of its own after tokenization (empty text).")
                model(input_ids=ids, attention_mask=attention)
                weights = own.double()[..., None]
                for point in points:
                    states = captured[point].double()
                    rows[point].append((states * weights).sum(1) / weights.sum(1))
    finally:
        for handle in handles:
            handle.remove()
    return {point: torch.cat(parts) for point, parts in rows.items()}


# -- estimators ---------------------------------------------------------------------------------------------
def mean_difference(a, b):
    """mean(A - B): the direction from side B's states to side A's."""
    return (a - b).mean(0)


def principal_directions(a, b, rank: int = 1):
    """SentenceDebias: top-`rank` principal directions of the pair-centred states, i.e. right-singular vectors of
    A - B; each signed to point from B to A (positive dot product with the mean difference)."""
    import torch

    differences = a - b
    _, _, vh = torch.linalg.svd(differences, full_matrices=False)
    directions = vh[:rank]
    signs = torch.sign(directions @ differences.mean(0))
    return directions * torch.where(signs == 0, 1.0, signs)[:, None].to(directions.dtype)


def fit_leace(a, b, *, affine: bool = True):
    """LEACE eraser with the side (A = 1, B = 0) as concept: zero cross-covariance with it after erasure.

    constrain_cov_trace is off: its mix with an orthogonal projection would give up that guarantee."""
    import torch
    from concept_erasure import LeaceFitter

    states = torch.cat([a, b])
    labels = torch.cat([torch.ones(len(a)), torch.zeros(len(b))]).to(states.dtype)[:, None]
    eraser = LeaceFitter.fit(states, labels, affine=affine, constrain_cov_trace=False).eraser
    if not bool(eraser.proj_left.abs().sum() > 0):
        raise DebiasError("LEACE found nothing to erase: the side explains too little of the hidden states "
                          "(concept-erasure's singular-value threshold 0.01); use more or other pairs.")
    return eraser


# -- the steering file ---------------------------------------------------------------------------------------
def write_steering(folder: Path, steer: dict, erase: dict, *, pickle_too: bool = True) -> list[str]:
    """steer.safetensors (+ steer.pt in lm-eval's own format when every entry fits it); returns the files written.

    steer: {hookpoint: lm-eval's entry}; erase: {hookpoint: {"proj_left", "proj_right", "bias" (or None)}}."""
    import torch
    from safetensors.torch import save_file

    tensors, header = {}, {"steer": {}, "erase": {}}
    for point, entry in steer.items():
        tensors[f"{point}/steering_vector"] = entry["steering_vector"].float().contiguous()
        if entry["bias"] is not None:
            tensors[f"{point}/bias"] = entry["bias"].float().contiguous()
        header["steer"][point] = {"steering_coefficient": float(entry["steering_coefficient"]),
                                  "action": entry["action"], "head_index": entry["head_index"],
                                  "bias": entry["bias"] is not None}
    for point, entry in erase.items():
        for key in ("proj_left", "proj_right"):
            tensors[f"{point}/erase/{key}"] = entry[key].float().contiguous()
        if entry["bias"] is not None:
            tensors[f"{point}/erase/bias"] = entry["bias"].float().contiguous()
        header["erase"][point] = {"rank": int(entry["proj_left"].shape[1]), "bias": entry["bias"] is not None}
    save_file(tensors, folder / STEER_SAFETENSORS, metadata={"format": FORMAT, "entries": json.dumps(header)})
    written = [STEER_SAFETENSORS]
    if pickle_too and steer and not erase:
        plain = {point: {key: (value.float() if isinstance(value, torch.Tensor) else value)
                         for key, value in entry.items()} for point, entry in steer.items()}
        torch.save(plain, folder / STEER_PT)
        written.insert(0, STEER_PT)
    return written


def fold_into_head(model, eraser) -> None:
    """W <- W (I - L R): the linear eraser of the head's input folded into the head (untied from the embeddings)."""
    import torch

    head = model.get_output_embeddings()
    weight = head.weight.data.double()
    left, right = eraser.proj_left.to(weight), eraser.proj_right.to(weight)
    folded = (weight - (weight @ left) @ right).to(head.weight.dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    head.weight = torch.nn.Parameter(folded)


# -- the stage ------------------------------------------------------------------------------------------------
class DirectionStage(MadeStage):
    """Estimate a bias direction (mean difference, SentenceDebias PCA) or LEACE eraser per layer from paired
    sentences; write it as lm-eval `steered` steering files (or, --fold, a model folder with LEACE in the head).
    No setting reproduces the base in every case (clamp 0 removes the direction), so the sweep adds the base."""

    name: ClassVar[str] = "direction"
    Options: ClassVar[type[DirectionOptions]] = DirectionOptions

    def evaluated_as(self, base: str | Path, out: str | Path) -> tuple[Path, str | None, dict]:
        """(model folder, lm-eval model class or None for the default, model_args) that score this stage's output:
        the folded model itself, or the base through hf-steered-safe with the steering file."""
        if self.opts.fold:
            return Path(out), None, {}
        return Path(base), "hf-steered-safe", {"steer_path": str(Path(out) / STEER_SAFETENSORS)}

    def make(self, base: str | Path, out: str | Path, *, force: bool = False, progress: bool = True) -> Path:
        import torch

        from debias_plugin.models import load_model
        from debias_plugin.outputs import OutputFolder, manifest

        opts = self.opts
        pairs_input = None if opts.pairs in ("winogender", "stereoset", "bbq") else opts.pairs
        folder = OutputFolder(out, inputs=[base, pairs_input], force=force, option="--out")
        started = time.perf_counter()
        pairs = read_pairs(opts)
        model, tokenizer, kind = load_model(base)
        if kind != "causal":
            raise DebiasError(f"{base}: a masked LM; lm-eval's steered model (HFLM) scores causal LMs only.")
        device = opts.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
        points = hookpoints(model, tokenizer, opts.layers)
        sentences = [p.advantaged for p in pairs] + [p.disadvantaged for p in pairs]
        states = hidden_states(model, tokenizer, sentences, points, max_length=opts.max_length,
                               batch_size=opts.batch_size, progress=progress)
        loaded = time.perf_counter()
        steer, erase, results = {}, {}, {}
        for point in points:
            a, b = states[point][: len(pairs)].cpu(), states[point][len(pairs):].cpu()
            steer_entry, erase_entry, results[point] = self._estimate(a, b)
            if steer_entry is not None:
                steer[point] = steer_entry
            if erase_entry is not None:
                erase[point] = erase_entry
        with folder.staging() as staging:
            if opts.fold:
                fold_into_head(model, erase[points[0]]["eraser"])
                model.save_pretrained(staging, safe_serialization=True)
                tokenizer.save_pretrained(staging)
                written = sorted(p.name for p in staging.iterdir())
            else:
                written = write_steering(staging, steer, erase)
            record = manifest(self.name, options=opts.model_dump(mode="json"),
                              inputs={"model": base, **pair_files(pairs)},
                              results={"pairs": len(pairs), "pooling": POOLING, "hookpoints": results,
                                       "files": written, "folded_into": "lm_head" if opts.fold else None},
                              timings={"hidden_states_s": round(loaded - started, 3),
                                       "total_s": round(time.perf_counter() - started, 3)})
            return folder.publish(staging, record)

    def _estimate(self, a, b) -> tuple[dict | None, dict | None, dict]:
        """(lm-eval steering entry or None, eraser entry or None, what the manifest reports) at one hookpoint."""
        import torch

        opts = self.opts
        difference = mean_difference(a, b)
        report = {"mean_difference_norm": float(difference.norm())}
        if opts.estimator == "leace":
            eraser = fit_leace(a, b, affine=opts.affine)
            rank = int((eraser.proj_left.abs().sum(0) > 0).sum())
            report["erased_rank"] = rank
            return None, {"proj_left": eraser.proj_left, "proj_right": eraser.proj_right, "bias": eraser.bias,
                          "eraser": eraser}, report
        if opts.estimator == "pca":
            directions = principal_directions(a, b, opts.rank)
            singular = (a - b).pow(2).sum()
            report["explained_variance"] = [float((((a - b) @ d) ** 2).sum() / singular) for d in directions]
            if opts.rank > 1:
                return None, {"proj_left": directions.T, "proj_right": directions, "bias": None}, report
            vector = directions[0]
        else:
            vector = difference
        unit = vector / vector.norm()
        report["mean_projection_a"], report["mean_projection_b"] = float((a @ unit).mean()), float((b @ unit).mean())
        bias = torch.cat([a, b]).mean(0) if opts.center else None  # the point a centred clamp measures from
        entry = {"steering_vector": vector, "steering_coefficient": float(opts.coefficient), "action": opts.action,
                 "bias": bias, "head_index": None}
        return entry, None, report

