"""Greedy answers under the backend's reference selection against dense, on a real model (CPU, float32).

    python eval/answer_fidelity.py --model qwen15 --out eval/results/answer_fidelity-qwen15.json

The prefix-sharing workload's user questions (``eval/prefix_sharing.py``: the same documents and
questions for the same workload flags) go through transformers one at a time. A prompt is attended
densely, as the backend's prefill does; dense then answers greedily, and each setting decodes that answer
teacher-forced: answer position ``t`` is one decode step whose sparse layers (``>= --dense-layers``)
attend what ``reference.select_union`` keeps for it, from the backend's own codes (``CodePool``'s
rotations, keys centred on the mean of the first ``--calibrate-tokens`` prompt keys) and its regions
(``reference.decode_regions``; decoded tokens are encoded in chunks as ``reference.plan_decode`` does).
A setting's free-running greedy answer equals dense's exactly when its arg-max is dense's token at every
position, so exact agreement needs no free run; per-token agreement and the KL divergence from dense also
measure the steps after a first difference. Float32 and one request at a time: what differs from dense is
the selection alone, without the GPU's batch-dependent rounding that the served comparison also holds.
A setting ending in ``exact`` (``"0.9,1.0,exact"``) is an oracle: each head's exact top-p set of the true
logits, so what sparse attention itself changes shows apart from what the estimate's errors add.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import prefix_sharing as PS  # noqa: E402
from eval import tasks as T  # noqa: E402
from eval.server import csv_list, flag_value, mean_known  # noqa: E402
from sglang_rabitq.code_pool import layer_rotations  # noqa: E402
from sglang_rabitq.config import RaBitQConfig  # noqa: E402
from sglang_rabitq.reference import code_values, decode_regions, encode_keys, quantize_query  # noqa: E402
from sglang_rabitq.reference.decode import select_union  # noqa: E402

ATTENTION = "rabitq_answer_fidelity"
DEFAULT_SETTINGS = "0.9,0.6;0.8,1.0;0.9,1.0;0.9,0.6,0.2;0.9,0.6,0.15;0.9,1.0,0.15;1.0,1.0,0.2"


@dataclass(frozen=True)
class Setting:
    top_p: float
    temperature: float
    max_budget: float = 1.0
    # an oracle: select by exact top-p (sort) from the true logits q.k instead of the estimate's
    # histogram, to tell what sparse attention itself changes from what the estimate's errors add
    exact: bool = False
    key_bits: int = 1  # bits per dimension of the key codes (--rabitq-key-bits)

    @property
    def label(self) -> str:
        cap = f" cap {self.max_budget:g}" if self.max_budget < 1.0 else ""
        bits = f" {self.key_bits}-bit keys" if self.key_bits > 1 else ""
        return f"p {self.top_p:g} t {self.temperature:g}{cap}" + (" exact logits" if self.exact else bits)


def parse_settings(text: str) -> list[Setting]:
    """``"p,t[,cap][,exact|,bB];..."`` -> settings (``exact``: the true-logit oracle; ``b2``: 2-bit keys)."""
    out = []
    for part in filter(str.strip, text.split(";")):
        fields = [x.strip() for x in part.split(",")]
        tail = fields[-1]
        exact, coded = tail == "exact", tail.startswith("b")
        nums = fields[:-1] if exact or coded else fields
        bits = int(tail[1:]) if coded else 1
        out.append(Setting(*(float(x) for x in nums), exact=exact, key_bits=bits))
    return out


@dataclass(frozen=True)
class Regions:
    sink: int = 64
    window: int = 64
    encode_chunk: int = 64


def encoded_lengths(prompt_len: int, steps: int, reg: Regions) -> list[int]:
    """Codes a decode step's selection may read, per answer position: the prompt's, plus the decoded
    tokens the lazy refresh has encoded so far (``chunk`` at a time, once the unencoded tail reaches
    ``window + chunk``; a step selects before its own refresh)."""
    out, enc = [], prompt_len
    for t in range(steps):
        out.append(enc)
        if prompt_len + t + 1 - enc >= reg.window + reg.encode_chunk:
            enc += reg.encode_chunk
    return out


class LayerCodes:
    """One sparse layer's codes of the cached keys, per bits per dimension: each key's code values
    (``reference.code_values``: +-1 signs for one bit; float64) and factors, encoded on first use and
    cut back with the cache."""

    def __init__(self, rot: torch.Tensor, center: torch.Tensor):
        self.rot, self.center = rot, center
        self.values: dict[int, torch.Tensor] = {}
        self.factors: dict[int, torch.Tensor] = {}

    def upto(self, keys: torch.Tensor, n: int, bits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Code values ``[n, Hkv, D]`` and factors ``[n, Hkv]`` of ``keys [>= n, Hkv, D]``: the
        estimate of ``<q, k_c>`` is ``factor <values, q'>``."""
        hkv, d = self.rot.shape[0], self.rot.shape[1]
        values = self.values.get(bits, torch.empty(0, hkv, d, dtype=torch.float64))
        factor = self.factors.get(bits, torch.empty(0, hkv, dtype=torch.float32))
        have = values.shape[0]
        if n > have:
            codes, f = encode_keys(keys[have:n], self.rot, self.center, bits)
            v = code_values(codes, d)
            self.values[bits], self.factors[bits] = torch.cat([values, v]), torch.cat([factor, f])
        return self.values[bits][:n], self.factors[bits][:n]

    def truncate(self, n: int) -> None:
        for bits in self.values:
            self.values[bits], self.factors[bits] = self.values[bits][:n], self.factors[bits][:n]


def decode_masks(q: torch.Tensor, keys: torch.Tensor, codes: LayerCodes, prompt_len: int, setting: Setting,
                 reg: Regions, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What each of ``T`` consecutive decode steps attends: ``q [T, Hq, D]`` are the queries of positions
    ``prompt_len .. prompt_len + T - 1`` over ``keys [prompt_len + T, Hkv, D]``. Returns the mask
    ``[Hkv, T, N]`` (bool) and per (step, kv-head) the fraction of its context attended ``[T, Hkv]``."""
    steps, hq, _ = q.shape
    n, hkv = keys.shape[0], keys.shape[1]
    group = hq // hkv
    enc = encoded_lengths(prompt_len, steps, reg)
    if setting.exact:  # the true logits (uncentred: a constant per query head, which top-p ignores)
        est = torch.einsum("nhd,thgd->thgn", keys.double(), q.double().view(steps, hkv, group, -1))
    else:
        signs, factor = codes.upto(keys, max(enc), setting.key_bits)
        q_u, delta, qmin = quantize_query(q, codes.rot)
        q_bar = q_u.to(torch.float64) * delta.to(torch.float64)[..., None] + qmin.to(torch.float64)[..., None]
        # the float form of the binary x INT4 estimate: g <2b - 1, q_bar>, equal to the integer form
        # (more bits: g <y, q_bar> over the odd grid values y)
        est = torch.einsum("nhd,thgd->thgn", signs, q_bar.view(steps, hkv, group, -1)) * factor.T.double()[None, :, None]
    mask = torch.zeros(hkv, steps, n, dtype=torch.bool)
    budget = torch.zeros(steps, hkv)
    for t in range(steps):
        length = prompt_len + t + 1
        r = decode_regions(length, enc[t], reg.sink, reg.window)
        mask[:, t, : r.sink_end] = True
        mask[:, t, r.score_end : length] = True
        for h in range(hkv):
            if r.score_end > r.sink_end:
                logits = est[t, h, :, r.sink_end : r.score_end] * sm_scale * setting.temperature
                keep = select_union(logits, setting.top_p, None, setting.max_budget,
                                    selector="exact" if setting.exact else "hist")
                mask[h, t, r.sink_end : r.score_end] = keep
            budget[t, h] = mask[h, t, :length].sum() / length
    return mask, budget


class Attention:
    """transformers attention function: causal dense attention, or in a decode pass the selection's mask
    in every sparse layer. ``query [1, Hq, T, D]``, ``key``/``value [1, Hkv, N, D]`` (the cache included)."""

    def __init__(self, rots: dict[int, torch.Tensor], reg: Regions, dense_layers: int):
        self.rots, self.reg, self.dense_layers = rots, reg, dense_layers
        self.codes: dict[int, LayerCodes] = {}
        self.setting: Setting | None = None  # set: a decode pass under that setting
        self.prompt_len = 0
        self.budgets: list[torch.Tensor] = []

    def calibrate(self, cache, tokens: int) -> None:
        """Centres from the first ``tokens`` cached keys of every sparse layer (then fixed, as the server's)."""
        for layer, rot in self.rots.items():
            center = cache.layers[layer].keys[0, :, :tokens].mean(1).float()
            self.codes[layer] = LayerCodes(rot, center)

    def truncate(self, n: int) -> None:
        for c in self.codes.values():
            c.truncate(n)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        steps, n = query.shape[2], key.shape[2]
        layer = module.layer_idx
        causal = torch.arange(n)[None, :] <= torch.arange(n - steps, n)[:, None]  # [T, N]
        mask = causal[None, None]
        if self.setting is not None and layer >= self.dense_layers:
            m, budget = decode_masks(query[0].transpose(0, 1).float(), key[0].transpose(0, 1).float(),
                                     self.codes[layer], self.prompt_len, self.setting, self.reg, scaling)
            group = query.shape[1] // key.shape[1]
            mask = (m & causal).repeat_interleave(group, dim=0)[None]
            self.budgets.append(budget)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------------------------- model


def attach(model, reg: Regions, dense_layers: int, seed: int) -> Attention:
    from transformers import AttentionInterface

    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rots = {layer: layer_rotations(d, seed, layer, range(cfg.num_key_value_heads))
            for layer in range(dense_layers, cfg.num_hidden_layers)}
    attn = Attention(rots, reg, dense_layers)
    AttentionInterface.register(ATTENTION, attn)
    model.config._attn_implementation = ATTENTION
    return attn


@torch.no_grad()
def prefill(model, cache, ids: list[int], chunk: int = 2048) -> torch.Tensor:
    """Appends ``ids`` to ``cache`` densely; returns the last position's logits."""
    for i in range(0, len(ids), chunk):
        out = model(input_ids=torch.tensor([ids[i : i + chunk]]), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    return out.logits[0, -1].float()


@torch.no_grad()
def greedy(model, cache, first_logits: torch.Tensor, max_tokens: int, eos: set[int]) -> list[int]:
    """Dense greedy answer from the prompt's logits (the cache grows by it)."""
    tokens = [int(first_logits.argmax())]
    while len(tokens) < max_tokens and tokens[-1] not in eos:
        logits = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


@torch.no_grad()
def teacher_forced(model, cache, attn: Attention, answer: list[int], setting: Setting | None) -> torch.Tensor:
    """Logits ``[len(answer) - 1, V]`` of the answer's decode steps (each predicting the next token)."""
    attn.setting = setting
    try:
        out = model(input_ids=torch.tensor([answer[:-1]]), past_key_values=cache, use_cache=True)
    finally:
        attn.setting = None
    return out.logits[0].float()


def compare(dense: torch.Tensor, other: torch.Tensor, targets: list[int]) -> dict:
    """Exact greedy agreement, first differing answer token, per-token agreement and mean KL(dense || other)."""
    pred = other.argmax(-1).tolist()
    miss = [i for i, (a, b) in enumerate(zip(pred, targets)) if a != b]
    kl = F.kl_div(F.log_softmax(other, -1), F.log_softmax(dense, -1), log_target=True, reduction="none").sum(-1)
    top2 = dense.topk(2, -1).values
    return {
        "exact": not miss,
        "first_diff": miss[0] + 1 if miss else None,  # answer token index (token 0 comes from the prefill)
        "token_agreement": 1.0 - len(miss) / max(len(targets), 1),
        "kl_mean": float(kl.mean()) if len(targets) else 0.0,
        "dense_margin_at_diff": float(top2[miss[0], 0] - top2[miss[0], 1]) if miss else None,
    }


# ----------------------------------------------------------------------------------------------- main


def user_questions(args, counter) -> tuple[list, list[dict]]:
    """The documents and the user-phase requests ``prefix_sharing.py`` sends for the same flags, in order."""
    work = PS.build_workload(SimpleNamespace(docs=args.docs, doc_tokens=args.doc_tokens, users=args.users,
                                             concurrency=args.concurrency, chats=args.chats, turns=args.turns,
                                             seed=args.seed), counter)
    reqs = [r for level in work["levels"] for r in level["requests"]]
    return work["docs"], reqs[: args.questions] if args.questions else reqs


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else None


def summarize(rows: list[dict], settings: list[Setting]) -> list[dict]:
    out = []
    for s in settings:
        rs = [r["settings"][s.label] for r in rows]
        out.append({"setting": s.label, "top_p": s.top_p, "temperature": s.temperature, "max_budget": s.max_budget,
                    "exact_logits": s.exact, "key_bits": s.key_bits,
                    "exact": mean_known([float(r["exact"]) for r in rs]),
                    "token_agreement": mean_known([r["token_agreement"] for r in rs]),
                    "kl_mean": mean_known([r["kl_mean"] for r in rs]), "budget": mean_known([r["budget"] for r in rs]),
                    # how sure dense was of the token a setting changed first: near-ties flip under any noise
                    "margin_at_diff_median": _median([r["dense_margin_at_diff"] for r in rs]),
                    "margin_at_diff_max": max((r["dense_margin_at_diff"] for r in rs if not r["exact"]), default=None),
                    "questions": len(rs)})
    return out


def served_setting(config: dict, head_dim: int, logged: dict | None = None) -> Setting:
    """The selection a ``prefix_sharing.py`` result's rabitq server ran with: the config it logged
    (``logged``, recorded since 2026-12-07), else its flags, and where one is absent the server's default
    for the model's ``head_dim`` (``RaBitQConfig.for_head_dim``; runs from before those defaults depended
    on the head dim, 2026-12-07, served 1-bit codes at every head dim)."""
    if logged:
        return Setting(logged["top_p"], logged["score_temperature"], logged["max_budget"], key_bits=logged["key_bits"])
    extra = config.get("rabitq_args") or ""
    given = {"score_temperature": flag_value(extra, "--rabitq-score-temperature"),
             "max_budget": flag_value(extra, "--rabitq-max-budget"), "key_bits": flag_value(extra, "--rabitq-key-bits")}
    cfg = RaBitQConfig(top_p=float(config["top_p"]), **{k: float(v) if k != "key_bits" else int(v)
                                                         for k, v in given.items() if v is not None})
    cfg = cfg.for_head_dim(head_dim)
    return Setting(cfg.top_p, cfg.score_temperature, cfg.max_budget, key_bits=cfg.key_bits)


def model_head_dim(model_dir: str) -> int:
    """Head dim of an HF model folder (``head_dim`` in config.json, else hidden size / heads)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def served_comparison(result: dict, served: dict, head_dim: int) -> dict:
    """Per user question, whether a served run (a ``prefix_sharing.py`` result of the same workload flags:
    GPU, batched, bf16) gave dense's answer, beside whether this study's selection at its setting did.
    Questions are matched by their prompt (``prefix_sharing.prompt_key``)."""
    runs = served["runs"]
    setting = served_setting(served["config"], head_dim, runs["rabitq"].get("rabitq_config"))
    dense = [x for lv in runs["dense"]["levels"] for x in lv["results"]]
    other = [x for lv in runs["rabitq"]["levels"] for x in lv["results"]]
    ours = {r["prompt_key"]: r for r in result["questions"]}
    cells = {"both_equal": 0, "only_served_differs": 0, "only_here_differs": 0, "both_differ": 0}
    seen = same_dense = 0
    for d, o in zip(dense, other):
        if "error" in d or "error" in o:
            continue
        mine = ours.get(d["prompt_key"])
        if mine is None or d["prompt_key"] != o["prompt_key"] or mine["expected"] != d["expected"]:
            raise ValueError("the served run asked other questions: not the same workload flags")
        if setting.label not in mine["settings"]:
            continue
        seen += 1
        here, there = mine["settings"][setting.label]["exact"], d["text"] == o["text"]
        same_dense += d["text"].strip() == mine["answer"].strip()
        cells[{(True, True): "both_equal", (False, True): "only_served_differs",
               (True, False): "only_here_differs", (False, False): "both_differ"}[(there, here)]] += 1
    frac = (lambda k: k / seen) if seen else (lambda k: None)
    return {"setting": setting.label, "questions": seen, **cells,
            "served_exact": frac(cells["both_equal"] + cells["only_here_differs"]),
            "here_exact": frac(cells["both_equal"] + cells["only_served_differs"]),
            "dense_answers_equal": frac(same_dense)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen15", help="HF folder, or a name known to eval/fetch_model.py")
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--doc-tokens", type=int, default=16000)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--concurrency", type=csv_list(int), default=[4, 16],
                    help="as given to prefix_sharing.py: one level of --users questions each")
    ap.add_argument("--chats", type=int, default=4, help="as given to prefix_sharing.py (takes questions too)")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--questions", type=int, default=0, help="only the first N user questions (0: all)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--settings", type=parse_settings, default=parse_settings(DEFAULT_SETTINGS),
                    help='"top_p,temperature[,max_budget][,exact|,bB];..." (exact: select from the true logits; '
                         'bB: B-bit key codes)')
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--encode-chunk", type=int, default=64)
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--calibrate-tokens", type=int, default=4096)
    ap.add_argument("--rotation-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument("--served", nargs="*", default=[], metavar="JSON",
                    help="prefix_sharing.py results of the same workload flags: per-question agreement beside ours")
    ap.add_argument("--compare-only", action="store_true",
                    help="read --out (a finished run) and only add the --served comparisons")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "answer_fidelity.json"))
    args = ap.parse_args(argv)
    if args.compare_only:
        result = add_prompt_keys(json.loads(Path(args.out).read_text()))
        return finish(result, args, [Setting(r["top_p"], r["temperature"], r["max_budget"],
                                             r.get("exact_logits", False), r.get("key_bits", 1))
                                     for r in result["summary"]])

    from transformers import DynamicCache

    from eval.fidelity import load_model

    model, tok, info = load_model(args.model)
    counter = T.TokenCounter(tok)
    docs, reqs = user_questions(args, counter)
    reg = Regions(args.sink, args.window, args.encode_chunk)
    attn = attach(model, reg, args.dense_layers, args.rotation_seed)
    eos = {t for t in [tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)] for t in
           (t if isinstance(t, list) else [t]) if t is not None}

    def ids_of(req):
        return list(tok.apply_chat_template(T.document_messages(docs[req["doc"]], req["question"]),
                                            add_generation_prompt=True, tokenize=True, return_dict=False))

    rows, t0 = [], time.time()
    for d in range(len(docs)):
        mine = [r for r in reqs if r["doc"] == d]
        if not mine:
            continue
        prompts = [ids_of(r) for r in mine]
        shared = min(common_prefix(prompts), min(map(len, prompts)) - 1)  # each prompt extends >= 1 token
        cache = DynamicCache(config=model.config)
        attn.truncate(0)
        prefill(model, cache, prompts[0][:shared])
        if not attn.codes:  # the first prompt's keys fix the centre, as a server's first prefill traffic
            attn.calibrate(cache, args.calibrate_tokens)
        print(f"doc {d}: {shared} shared tokens, {time.time() - t0:.0f} s", flush=True)
        for req, ids in zip(mine, prompts):
            cache.crop(shared)
            attn.truncate(shared)
            first = prefill(model, cache, ids[shared:])
            attn.prompt_len = len(ids)
            answer = greedy(model, cache, first, args.max_tokens, eos)
            cache.crop(len(ids))
            dense = teacher_forced(model, cache, attn, answer, None)
            targets, text = answer[1:], tok.decode(answer, skip_special_tokens=True)
            row = {"doc": d, "question": req["question"], "expected": req["answer"], "prompt_tokens": len(ids),
                   "prompt_key": PS.prompt_key(T.document_messages(docs[d], req["question"])),
                   "answer": text, "answer_tokens": len(answer), "dense_correct": T.score_any(text, [req["answer"]]),
                   # dense teacher-forced must give back its own greedy answer: the harness's noise floor
                   "dense_forced_exact": compare(dense, dense, targets)["exact"], "settings": {}}
            for s in args.settings:
                cache.crop(len(ids))
                attn.budgets = []
                logits = teacher_forced(model, cache, attn, answer, s)
                row["settings"][s.label] = {**compare(dense, logits, targets),
                                            "budget": float(torch.stack(attn.budgets).mean()) if attn.budgets else None}
            rows.append(row)
            print(f"  q{len(rows)}: {len(answer)} tokens, " + ", ".join(
                f"{k}: {'=' if v['exact'] else v['first_diff']}" for k, v in row["settings"].items())
                + f" ({time.time() - t0:.0f} s)", flush=True)
    result = {"model": info, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "config": {k: (v if k != "settings" else [s.label for s in v]) for k, v in vars(args).items()},
              "dense_correct": mean_known([r["dense_correct"] for r in rows]),
              "dense_forced_exact": mean_known([float(r["dense_forced_exact"]) for r in rows]), "questions": rows,
              "wall_s": time.time() - t0}
    return finish(result, args, args.settings)


def add_prompt_keys(result: dict) -> dict:
    """Fills in each question's prompt key where a result file lacks it (the workload rebuilt from its flags)."""
    if all("prompt_key" in r for r in result["questions"]):
        return result
    from eval.fetch_model import fetch

    name = result["model"]["name"]
    tok = T.load_tokenizer(name if Path(name).exists() else str(fetch(name)))
    docs, _ = user_questions(SimpleNamespace(**result["config"]), T.TokenCounter(tok))
    for r in result["questions"]:
        r["prompt_key"] = PS.prompt_key(T.document_messages(docs[r["doc"]], r["question"]))
    return result


def finish(result: dict, args, settings: list[Setting]) -> dict:
    """Adds the per-setting summary and the served comparisons; writes the JSON and its markdown table."""
    result["summary"] = summarize(result["questions"], settings)
    if args.served:
        head_dim = model_head_dim(result["model"]["path"])
        result["served"] = [{"file": Path(f).name, **served_comparison(result, json.loads(Path(f).read_text()), head_dim)}
                            for f in args.served]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# Greedy answers vs dense under the reference selection ({result['model']['name']}, CPU float32)", "",
             f"{result['date']}, torch {result['torch']}; {len(result['questions'])} user questions of the "
             f"prefix-sharing workload ({cfg['docs']} documents of {cfg['doc_tokens']} tokens, up to "
             f"{cfg['max_tokens']} answer tokens); dense answers correct: {result['dense_correct']:.1f} %; dense "
             f"teacher-forced = its greedy answer: {result['dense_forced_exact']:.3f}; {result['wall_s']:.0f} s on "
             f"{result.get('machine', 'the CPU')}.", "", f"    {result.get('command', '')}", "",
             "K/V budget: attended / context, averaged over sparse layers, answer steps and kv-heads.", "",
             "Margin: dense's top-1 minus top-2 logit at the first answer token the setting changed (median, max "
             "over the changed answers): a small one is a near-tie, a large one a token dense was sure of.", "",
             "| setting | exact answers | token agreement | KL(dense, setting) per token | K/V budget | margin at "
             "first difference (median / max) |",
             "|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in result["summary"]:
        lines.append(f"| {r['setting']} | {r['exact']:.3f} | {r['token_agreement']:.3f} | {r['kl_mean']:.4f} | "
                     f"{r['budget']:.3f} | {fmt(r.get('margin_at_diff_median'))} / {fmt(r.get('margin_at_diff_max'))} |")
    if result.get("served"):
        lines += ["", "The same questions served (dense and rabitq servers on a GPU, batched, bf16) against this "
                  "study at the served setting: answers equal to dense's there and here.", "",
                  "| served file | setting | questions | equal there | equal here | both equal | only there differs "
                  "| only here differs | both differ | dense answers equal (served vs here) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in result["served"]:
            lines.append(f"| `{c['file']}` | {c['setting']} | {c['questions']} | {c['served_exact']:.3f} | "
                         f"{c['here_exact']:.3f} | {c['both_equal']} | {c['only_served_differs']} | "
                         f"{c['only_here_differs']} | {c['both_differ']} | {c['dense_answers_equal']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
