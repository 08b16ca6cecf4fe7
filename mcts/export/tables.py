"""Training tables from searched trees: traces, DPO preference pairs, stepwise PRM data.

What a row means (the data says what the search saw and what it measured):

Prompt. `prompt` is TRL's conversational format: the messages the policy was sampled with,
exactly as mcts.prompts.problem_messages(question, system) builds them, with the run's
system prompt (results row fingerprint_fields["search.system_prompt"]; a row without a
fingerprint gets DEFAULT_SYSTEM, and `system_prompt_source` says "default", not "run").
A step pair below the root continues an assistant turn the policy had already begun, so its
prompt ends with ONE assistant message holding the prefix steps, each followed by the run's
delimiter (mcts.prompts.join_steps: the text the search appended after the chat template's
generation prompt). chosen / rejected = [{"role": "assistant", "content": c}], c the sibling
step's exact text (kind "step") or the full solution, its steps joined by the delimiter
(kind "trajectory", no prefix). The former plain-text layout stays, in `*_text` columns:

    prompt_text = question + "\\n\\n" + "".join(step + "\\n\\n" for step in prefix_steps)
    chosen_text / rejected_text = the continuation (trajectory steps joined by "\\n\\n")

EOS policy. `chosen_eos` / `rejected_eos`: whether that side ends the solution (the policy
emitted EOS after it: node finish == "eos"; trees without `finish`: terminal);
`continues` = not (chosen_eos and rejected_eos). TRL's DPOTrainer (read in trl 1.16) ends
every completion: conversational rows are rendered whole by the chat template, which closes
the assistant turn (its end-of-turn token) after chosen / rejected, and renders a prompt's
trailing assistant message as a closed turn followed by a new one; plain-text rows get
eos_token appended. DPOConfig has no option to turn that off. So rows with `continues` or
a prefix are trained through `pretokenize_pair(row, tokenizer)`: prompt_ids = the chat
template (generation prompt on) + the prefix text, as the generators render it; chosen_ids /
rejected_ids = the side's tokens, then tokenizer.eos_token_id only where that side ends the
solution. TRL 1.16 always re-tokenizes text datasets; hand it the ids through a subclass:

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # rows hold prompt_ids / chosen_ids / rejected_ids already

Rows with no prefix and not `continues` (trajectory pairs ending in EOS, final steps at the
root) are also right when DPOTrainer tokenizes the conversational columns itself.

Values. One scale per table: a node's value is its value_target, never its q (`value_kind`
"mc" | "rest": the results row's search.value_target, "auto" resolved as the search does:
rest for rest_mcts, mc otherwise). Nodes without a value target are not paired, and paths
with one are left out of stepwise. Support (`chosen_support` / `rejected_support`): the
merged sample count of the checked terminal solutions at or below the node.
Step pairs: two children of one parent (so they share the prefix exactly), both with a value
target, at least `min_visits` visits and at least `min_support` support, different texts,
chosen value > rejected value and gap >= margin. Trajectory pairs: a correct terminal
solution vs an incorrect one of the same problem, both with a value target, gap >= margin;
their values are the terminals' value targets (mc: 1.0 / 0.0). Their label is a checked outcome, not an
estimate, so min_support does not filter them (their support is the solution's sample count).
stepwise labels: value >= label_threshold (0.5 by default) per step.

Tokens. The tokens the policy actually sampled, and its own logprob of each, read off the
tree (mcts.export.trees; mcts.state.NodeData says how the search records them). A plain
step's ids are exact: every token the backend sampled for that step, as
mcts.generators.base defines them (up to and including the token that completed the
delimiter, or the EOS token where the step ended the solution), so they may differ from
encoding the stripped step text, which is what pretokenize_pair does. The prompt they
continue is the chat template + the prefix text, as the generators render it (pretokenize_pair's
prompt_ids). Null means unknown, never empty:
  pairs_dpo, kind "step": `chosen_token_ids` / `chosen_token_logprobs` /
    `rejected_token_ids` / `rejected_token_logprobs` are that sibling step's ids; null for a
    piece of a to_end sample (a full solution sampled at once and split at the delimiter by
    characters: its tokens do not split at those cuts) and for trees written before tokens
    were recorded.
  pairs_dpo, kind "trajectory": the same columns hold the whole solution's ids where it is
    ONE sample from the root: a to_end sample whose first piece is a child of the root (its
    last node's sample_token_ids), or a single plain step that ended the solution. Else
    null: a solution grown step by step is several samples, each conditioned on the prefix
    re-rendered as text, and the concatenation of their ids is not a sequence the policy
    sampled (the token that completed each delimiter may carry text past it, and the next
    step's prompt re-encodes the prefix), so it is not exported as if it were.
  traces: `token_ids` / `token_logprobs`, one entry per step (null entries where unknown,
    as for step pairs); stepwise: `completion_token_ids`, likewise.
The logprobs are the sampling policy's own (the generators report the raw model's
distribution, temperature 1, no top-p), rounded to 6 significant digits in the tree file.
They serve as DPO reference logprobs only for the very policy (weights) that sampled them,
and only with the ids above: a trained or different model needs its own reference pass.
Where identical siblings were merged (count > 1) the ids are the first sample's.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import pyarrow as pa

from mcts.export.trees import children, find_root, node_value, path_to, terminal_nodes
from mcts.prompts import DEFAULT_SYSTEM, join_steps, problem_messages

SEP = "\n\n"
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# Why candidate pairs were left out (write_exports reports a count per reason).
DROP_REASONS = ("no_value_target", "min_support", "margin", "max_pairs")

TRACES_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("algorithm", pa.string()),
        ("question", pa.string()),
        ("reference", pa.string()),
        ("path_index", pa.int32()),
        ("node_ids", pa.list_(pa.int64())),
        ("steps", pa.list_(pa.string())),
        ("visits", pa.list_(pa.int64())),
        ("q", pa.list_(pa.float64())),
        ("reward", pa.list_(pa.float64())),
        ("value_target", pa.list_(pa.float64())),
        ("prior", pa.list_(pa.float64())),
        ("depth", pa.int32()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("selected", pa.bool_()),
        ("token_ids", pa.list_(pa.list_(pa.int64()))),
        ("token_logprobs", pa.list_(pa.list_(pa.float64()))),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("kind", pa.string()),
        ("continues", pa.bool_()),
        ("chosen_eos", pa.bool_()),
        ("rejected_eos", pa.bool_()),
        ("value_kind", pa.string()),
        ("gap", pa.float64()),
        ("chosen_value", pa.float64()),
        ("rejected_value", pa.float64()),
        ("chosen_support", pa.int64()),
        ("rejected_support", pa.int64()),
        ("prompt_text", pa.string()),
        ("chosen_text", pa.string()),
        ("rejected_text", pa.string()),
        ("system_prompt", pa.string()),
        ("system_prompt_source", pa.string()),
        ("delimiter", pa.string()),
        ("problem_id", pa.string()),
        ("algorithm", pa.string()),
        ("question", pa.string()),
        ("prefix_steps", pa.list_(pa.string())),
        ("parent_node", pa.int64()),
        ("chosen_node", pa.int64()),
        ("rejected_node", pa.int64()),
        ("chosen_token_ids", pa.list_(pa.int64())),
        ("chosen_token_logprobs", pa.list_(pa.float64())),
        ("rejected_token_ids", pa.list_(pa.int64())),
        ("rejected_token_logprobs", pa.list_(pa.float64())),
    ]
)

STEPWISE_SCHEMA = pa.schema(
    [
        ("prompt", MESSAGES),
        ("completions", pa.list_(pa.string())),
        ("labels", pa.list_(pa.bool_())),
        ("values", pa.list_(pa.float64())),
        ("value_kind", pa.string()),
        ("prompt_text", pa.string()),
        ("system_prompt", pa.string()),
        ("system_prompt_source", pa.string()),
        ("problem_id", pa.string()),
        ("algorithm", pa.string()),
        ("correct", pa.bool_()),
        ("selected", pa.bool_()),
        ("completion_token_ids", pa.list_(pa.list_(pa.int64()))),
    ]
)


def make_prompt(question: str, prefix_steps: Iterable[str] = ()) -> str:
    """The plain-text prompt layout documented above (`prompt_text`)."""
    return question + SEP + "".join(s + SEP for s in prefix_steps)


@dataclass(frozen=True)
class RunPrompting:
    """How a run prompted the policy, and the scale of its value targets."""

    system: str  # "" = no system message
    system_source: str  # "run" (recorded in the results row) | "default" (not recorded)
    delimiter: str
    value_kind: str  # "mc" | "rest"

    def messages(self, question: str, prefix_steps: Iterable[str] = ()) -> list[dict[str, str]]:
        """The messages the policy saw: system + user, plus the begun assistant turn."""
        msgs = [
            {"role": m.role, "content": m.content} for m in problem_messages(question, self.system)
        ]
        prefix = join_steps(list(prefix_steps), self.delimiter)
        if prefix:
            msgs.append({"role": "assistant", "content": prefix})
        return msgs


def run_prompting(row: dict[str, Any] | None, graph: nx.DiGraph | None = None) -> RunPrompting:
    """The run's system prompt, delimiter and value scale, read off its results row."""
    row = row or {}
    ff = row.get("fingerprint_fields")
    ff = ff if isinstance(ff, dict) else {}
    if isinstance(ff.get("search.system_prompt"), str):
        system, source = ff["search.system_prompt"], "run"
    else:
        system, source = DEFAULT_SYSTEM, "default"
    delim = ff.get("search.delimiter")
    delim = delim if isinstance(delim, str) and delim else SEP
    algo = ff.get("search.algorithm") or row.get("algorithm")
    if algo is None and graph is not None:
        algo = graph.graph.get("algorithm")
    kind = ff.get("search.value_target") or "auto"
    if kind == "auto":
        kind = "rest" if algo == "rest_mcts" else "mc"
    return RunPrompting(system, source, delim, str(kind))


def _float(x: Any) -> float:
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _opt_bool(x: Any) -> bool | None:
    return None if x is None else bool(x)


def _meta(graph: nx.DiGraph, row: dict[str, Any] | None) -> tuple[str, str, str, str | None]:
    row = row or {}
    g = graph.graph
    pid = g.get("problem_id", row.get("id"))
    question = g.get("question", row.get("question"))
    if pid is None or question is None:
        raise ValueError(
            "a tree needs graph attributes problem_id and question (or its results row)"
        )
    algorithm = g.get("algorithm", row.get("algorithm")) or ""
    reference = g.get("reference", row.get("reference"))
    return str(pid), str(algorithm), str(question), None if reference is None else str(reference)


def target_value(attrs: dict[str, Any]) -> float:
    """A node's value target (NaN where none): never q, so one table keeps one scale."""
    return node_value(attrs, q_fallback=False)


def ends_solution(attrs: dict[str, Any]) -> bool:
    """Whether the policy emitted EOS after this step (trees without `finish`: terminal)."""
    finish = attrs.get("finish")
    if finish:
        return finish == "eos"
    return bool(attrs.get("terminal", False))


def step_token_ids(attrs: dict[str, Any]) -> list[int] | None:
    """A plain step's sampled token ids (None where unknown; see "Tokens." above)."""
    ids = attrs.get("token_ids")
    return [int(x) for x in ids] if ids else None


def step_token_logprobs(attrs: dict[str, Any]) -> list[float] | None:
    """The policy's logprobs of a plain step's sampled tokens (None where unknown)."""
    if not attrs.get("token_ids"):
        return None
    lps = attrs.get("token_logprobs")
    return None if lps is None else [_float(x) for x in lps]


def solution_tokens(
    graph: nx.DiGraph, node: Any, root: Any
) -> tuple[list[int] | None, list[float] | None]:
    """The ids / logprobs of the whole root-to-`node` solution where it is ONE sample from
    the root (a to_end sample whose head is a child of the root, or a single plain step),
    else (None, None): step-by-step ids do not concatenate into a sampled sequence."""
    a = graph.nodes[node]
    ids = a.get("sample_token_ids")
    if ids:
        head = a.get("sample_head")
        nodes = path_to(graph, node, root).nodes
        if nodes and head is not None and head == nodes[0]:
            lps = a.get("sample_token_logprobs")
            return [int(x) for x in ids], None if lps is None else [_float(x) for x in lps]
        return None, None
    if list(graph.predecessors(node)) == [root]:
        return step_token_ids(a), step_token_logprobs(a)
    return None, None


def support(graph: nx.DiGraph) -> dict[Any, int]:
    """Per node: the merged sample count of checked terminal solutions at or below it."""
    out: dict[Any, int] = {}
    for n in reversed(list(nx.topological_sort(graph))):
        a = graph.nodes[n]
        own = (
            int(a.get("count", 1) or 1) if a.get("terminal") and a.get("correct") is not None else 0
        )
        out[n] = own + sum(out[c] for c in graph.successors(n))
    return out


def trace_rows(graph: nx.DiGraph, row: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One record per root-to-terminal path of the tree."""
    pid, algo, question, ref = _meta(graph, row)
    root = find_root(graph)
    out = []
    for i, t in enumerate(terminal_nodes(graph)):
        p = path_to(graph, t, root)
        attrs = [graph.nodes[n] for n in p.nodes]
        out.append(
            {
                "problem_id": pid,
                "algorithm": algo,
                "question": question,
                "reference": ref,
                "path_index": i,
                "node_ids": [int(n) for n in p.nodes],
                "steps": list(p.steps),
                "visits": [int(a.get("visits", 0) or 0) for a in attrs],
                "q": [_float(a.get("q")) for a in attrs],
                "reward": [_float(a.get("reward")) for a in attrs],
                "value_target": [_float(a.get("value_target")) for a in attrs],
                "prior": [_float(a.get("prior")) for a in attrs],
                "depth": len(p.nodes),
                "answer": graph.nodes[t].get("answer"),
                "correct": _opt_bool(graph.nodes[t].get("correct")),
                "selected": bool(graph.nodes[t].get("selected", False)),
                "token_ids": [step_token_ids(a) for a in attrs],
                "token_logprobs": [step_token_logprobs(a) for a in attrs],
            }
        )
    return out


# (node, value, text, support, ends_solution, token_ids, token_logprobs) of one side of a
# pair; the ids / logprobs None where unknown
Side = tuple[Any, float, str, int, bool, list[int] | None, list[float] | None]


def _pair(
    rp: RunPrompting,
    meta: tuple[str, str, str],
    kind: str,
    prefix: list[str],
    hi: Side,
    lo: Side,
    parent: Any,
) -> dict[str, Any]:
    pid, algo, question = meta
    return {
        "prompt": rp.messages(question, prefix),
        "chosen": [{"role": "assistant", "content": hi[2]}],
        "rejected": [{"role": "assistant", "content": lo[2]}],
        "kind": kind,
        "continues": not (hi[4] and lo[4]),
        "chosen_eos": hi[4],
        "rejected_eos": lo[4],
        "value_kind": rp.value_kind,
        "gap": hi[1] - lo[1],
        "chosen_value": hi[1],
        "rejected_value": lo[1],
        "chosen_support": hi[3],
        "rejected_support": lo[3],
        "prompt_text": make_prompt(question, prefix),
        "chosen_text": hi[2].replace(rp.delimiter, SEP) if kind == "trajectory" else hi[2],
        "rejected_text": lo[2].replace(rp.delimiter, SEP) if kind == "trajectory" else lo[2],
        "system_prompt": rp.system,
        "system_prompt_source": rp.system_source,
        "delimiter": rp.delimiter,
        "problem_id": pid,
        "algorithm": algo,
        "question": question,
        "prefix_steps": prefix,
        "parent_node": None if parent is None else int(parent),
        "chosen_node": int(hi[0]),
        "rejected_node": int(lo[0]),
        "chosen_token_ids": hi[5],
        "chosen_token_logprobs": hi[6],
        "rejected_token_ids": lo[5],
        "rejected_token_logprobs": lo[6],
    }


def step_pairs(
    graph: nx.DiGraph,
    margin: float,
    row: dict[str, Any] | None = None,
    *,
    min_visits: int = 1,
    min_support: int = 1,
    max_pairs_per_node: int | None = None,
    dropped: Counter | None = None,
) -> list[dict[str, Any]]:
    """Sibling-step preference pairs on the value-target scale (see the module docstring).

    dropped: a Counter that receives, per DROP_REASONS key, the sibling pairs (distinct
    texts, both with min_visits) that were left out."""
    dropped = dropped if dropped is not None else Counter()
    pid, algo, question, _ = _meta(graph, row)
    rp = run_prompting(row, graph)
    root = find_root(graph)
    sup = support(graph)
    out = []
    for parent in sorted(graph.nodes):
        kids = children(graph, parent)
        if len(kids) < 2:
            continue
        sides: list[Side] = []
        for c in kids:
            a = graph.nodes[c]
            if int(a.get("visits", 0) or 0) >= min_visits:
                sides.append(
                    (
                        c,
                        target_value(a),
                        str(a.get("text", "")),
                        sup[c],
                        ends_solution(a),
                        step_token_ids(a),
                        step_token_logprobs(a),
                    )
                )
        cands = []
        for x, y in itertools.combinations(sides, 2):
            if x[2] == y[2]:
                continue
            if not (math.isfinite(x[1]) and math.isfinite(y[1])):
                dropped["no_value_target"] += 1
                continue
            if min(x[3], y[3]) < min_support:
                dropped["min_support"] += 1
                continue
            hi, lo = (x, y) if x[1] >= y[1] else (y, x)
            if hi[1] > lo[1] and hi[1] - lo[1] >= margin:
                cands.append((hi, lo))
            else:
                dropped["margin"] += 1
        cands.sort(key=lambda p: (-(p[0][1] - p[1][1]), p[0][0], p[1][0]))
        if max_pairs_per_node is not None and len(cands) > max_pairs_per_node:
            dropped["max_pairs"] += len(cands) - max_pairs_per_node
            cands = cands[:max_pairs_per_node]
        if not cands:
            continue
        prefix = list(path_to(graph, parent, root).steps) if parent != root else []
        out += [_pair(rp, (pid, algo, question), "step", prefix, h, lo, parent) for h, lo in cands]
    return out


def trajectory_pairs(
    graph: nx.DiGraph,
    row: dict[str, Any] | None = None,
    *,
    max_pairs: int | None = 8,
    margin: float = 0.0,
    dropped: Counter | None = None,
) -> list[dict[str, Any]]:
    """Correct-vs-incorrect full-solution pairs; highest-valued solutions of each side first
    (chosen value > rejected value and gap >= margin, as for step pairs)."""
    dropped = dropped if dropped is not None else Counter()
    pid, algo, question, _ = _meta(graph, row)
    rp = run_prompting(row, graph)
    root = find_root(graph)
    # distinct solution text -> [value, node, support, ends_solution] (first terminal's)
    good: dict[str, list[Any]] = {}
    bad: dict[str, list[Any]] = {}
    for t in terminal_nodes(graph):
        a = graph.nodes[t]
        if a.get("correct") is None:
            continue
        text = rp.delimiter.join(path_to(graph, t, root).steps)
        side = good if a["correct"] else bad
        n = int(a.get("count", 1) or 1)
        if text in side:
            side[text][2] += n
        else:
            side[text] = [target_value(a), t, n, ends_solution(a)]

    def ranked(side: dict[str, list[Any]]) -> list[Side]:
        kept = [(text, v) for text, v in side.items() if math.isfinite(v[0])]
        kept.sort(key=lambda kv: (-kv[1][0], kv[1][1]))
        return [
            (node, v, text, s, e, *solution_tokens(graph, node, root))
            for text, (v, node, s, e) in kept
        ]

    g, b = ranked(good), ranked(bad)
    dropped["no_value_target"] += len(good) * len(bad) - len(g) * len(b)
    combos = sorted(
        itertools.product(range(len(g)), range(len(b))), key=lambda ij: (ij[0] + ij[1], ij[0])
    )
    kept = [(i, j) for i, j in combos if g[i][1] > b[j][1] and g[i][1] - b[j][1] >= margin]
    dropped["margin"] += len(combos) - len(kept)
    if max_pairs is not None and len(kept) > max_pairs:
        dropped["max_pairs"] += len(kept) - max_pairs
        kept = kept[:max_pairs]
    meta = (pid, algo, question)
    return [_pair(rp, meta, "trajectory", [], g[i], b[j], None) for i, j in kept]


def stepwise_rows(
    graph: nx.DiGraph, row: dict[str, Any] | None = None, *, label_threshold: float = 0.5
) -> tuple[list[dict[str, Any]], int]:
    """PRM rows (one per root-to-terminal path) and how many paths were skipped because a
    step on them has no value target."""
    pid, algo, question, _ = _meta(graph, row)
    rp = run_prompting(row, graph)
    root = find_root(graph)
    out, skipped = [], 0
    for t in terminal_nodes(graph):
        p = path_to(graph, t, root)
        values = [target_value(graph.nodes[n]) for n in p.nodes]
        if not values or not all(math.isfinite(v) for v in values):
            skipped += 1
            continue
        out.append(
            {
                "prompt": rp.messages(question),
                "completions": list(p.steps),
                "labels": [v >= label_threshold for v in values],
                "values": values,
                "value_kind": rp.value_kind,
                "prompt_text": question,
                "system_prompt": rp.system,
                "system_prompt_source": rp.system_source,
                "problem_id": pid,
                "algorithm": algo,
                "correct": _opt_bool(graph.nodes[t].get("correct")),
                "selected": bool(graph.nodes[t].get("selected", False)),
                "completion_token_ids": [step_token_ids(graph.nodes[n]) for n in p.nodes],
            }
        )
    return out, skipped


def pretokenize_pair(row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
    """prompt_ids / chosen_ids / rejected_ids of one pairs_dpo row, as the policy saw them.

    prompt: the chat template over the system + user messages with the generation prompt
    on, then the begun assistant turn (the prefix steps), encoded without added special
    tokens, as the generators render and encode it; each side: its text's tokens, then
    tokenizer.eos_token_id only where that side ends the solution (the EOS policy above)."""
    msgs = [dict(m) for m in row["prompt"]]
    prefix = msgs.pop()["content"] if msgs and msgs[-1]["role"] == "assistant" else ""
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    def side(messages: Any, eos: bool) -> list[int]:
        (m,) = list(messages)
        ids = encode(m["content"])
        return ids + [int(tokenizer.eos_token_id)] if eos else ids

    return {
        "prompt_ids": encode(text + prefix),
        "chosen_ids": side(row["chosen"], bool(row["chosen_eos"])),
        "rejected_ids": side(row["rejected"], bool(row["rejected_eos"])),
    }


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table with exactly `schema` (also when there are no rows)."""
    return pa.Table.from_pylist(rows, schema=schema)
