"""Parameter budgets: from unit scores or keep probabilities to hard masks that never exceed them.

The pruning ratio r removes that fraction of the decoder-linear parameters, so a mask may keep at
most `keep_fraction(r) * P` of them. Every selection here holds that exactly (kept <= budget) and
comes within one unit of it wherever the units allow; `budget_report` says when they do not.

One rule turns a count of query heads into a valid `query_head` mask: a layer with n_kv key/value
heads keeps floor(k / n_kv) query heads in every group (`even_query_heads`), so `repeat_kv` works.
Heads are decided first, with their exact cost (a kept group still pays for its whole k/v head),
then MLP channels fill what is left of the budget (`select_under_budget`).

PG's probabilities are kept feasible in expectation by `project_probs` (a weighted projection,
pg_math.project) over budget groups: heads and channels separately or jointly, all layers at
once (global) or each layer on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adapters import LayerShape
from .space import Mask, PruningSpace

BUDGETS = ("separate", "joint")
SCOPES = ("global", "per_layer")
TOLERANCE = 1e-6  # parameters: float slack on integer counts


def keep_fraction(ratio: float) -> float:
    """The fraction of decoder-linear parameters kept at pruning ratio `ratio`."""
    return 1.0 - ratio


def fill_budget(scores: Tensor, costs: Tensor, budget: float, greedy: bool = True) -> Tensor:
    """Keep units by descending score while they fit: sum(costs[kept]) <= budget.

    greedy: a unit that does not fit is skipped and smaller, lower-scored units fill the rest (a
    knapsack fill). Not greedy: a threshold on the score, the longest prefix that fits (how FLAP
    cuts its ranking; the reference takes the prefix closest to the budget, which may exceed it
    by part of a unit, this one never does).
    """
    keep = torch.zeros(len(scores), dtype=torch.bool)
    if len(scores) == 0 or budget < 0:
        return keep
    order = torch.argsort(scores.double(), descending=True, stable=True)
    ordered_costs = costs.double()[order]
    fits = torch.cumsum(ordered_costs, 0) <= budget + TOLERANCE
    n_prefix = int(fits.long().cumprod(0).sum())
    keep[order[:n_prefix]] = True
    if not greedy:
        return keep
    used = float(ordered_costs[:n_prefix].sum())
    for i, c in zip(order[n_prefix:].tolist(), ordered_costs[n_prefix:].tolist()):
        if used + c <= budget + TOLERANCE:
            keep[i] = True
            used += c
    return keep


def top_k(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest scores (ties: the earlier index)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(scores.double(), descending=True, stable=True)[:k]] = True
    return keep


def head_step(space: PruningSpace, layer: int) -> int:
    """Attention units a layer's kept count moves by: n_kv for `query_head` (one per group), else 1."""
    return space.shapes[layer].n_kv if space.granularity == "query_head" and space.shapes[layer].n_kv else 1


def even_query_heads(space: PruningSpace, layer: int, scores: Tensor, k: int) -> Tensor:
    """Keep the best units of a layer, k of them rounded down to a multiple of the step: for
    `query_head`, floor(k / n_kv) query heads, the best ones, in every key/value group."""
    if space.granularity != "query_head":
        return top_k(scores, k)
    s = space.shapes[layer]
    per_group = min(s.group_size, k // s.n_kv)
    return torch.stack([top_k(g, per_group) for g in scores.view(s.n_kv, s.group_size)]).flatten()


def attention_only_params(space: PruningSpace, layer: int, head_mask: Tensor) -> int:
    """Exact parameters layer `layer` keeps with `head_mask` and no MLP channel (fixed biases included)."""
    s = space.shapes[layer]
    n_q = len(space.kept_query_heads(layer, head_mask))
    n_kv = len(space.kept_kv_heads(layer, head_mask))
    return space.layer_params(LayerShape(n_q, n_kv, s.head_dim, 0), layer)


def _drop_weakest_step(space: PruningSpace, layers: list[int], heads: list[Tensor], scores: list[Tensor]) -> bool:
    """Remove one step of attention units where the weakest kept step scores lowest; False if none left."""
    best = None
    for l in layers:
        kept = int(heads[l].sum())
        if kept == 0:
            continue
        candidate = even_query_heads(space, l, scores[l], kept - head_step(space, l))
        loss = float(scores[l].double()[heads[l] & ~candidate].sum())
        if best is None or loss < best[0]:
            best = (loss, l, candidate)
    if best is None:
        return False
    heads[best[1]] = best[2]
    return True


def _add_best_steps(space: PruningSpace, layers: list[int], heads: list[Tensor], scores: list[Tensor],
                    room: float) -> float:
    """Add attention steps (the best-scored affordable one first) while their exact cost fits in
    `room` parameters; returns the room left."""
    while True:
        best = None
        for l in layers:
            kept = int(heads[l].sum())
            if kept >= space.n_head_units(l):
                continue
            grown = even_query_heads(space, l, scores[l], kept + head_step(space, l))
            cost = attention_only_params(space, l, grown) - attention_only_params(space, l, heads[l])
            gain = float(scores[l].double()[grown & ~heads[l]].mean())
            if cost <= room + TOLERANCE and (best is None or gain > best[0]):
                best = (gain, l, grown, cost)
        if best is None:
            return room
        heads[best[1]] = best[2]
        room -= best[3]


def select_under_budget(space: PruningSpace, head_scores: list[Tensor], channel_scores: list[Tensor], keep: float,
                        budget: str = "joint", scope: str = "global", greedy: bool = True) -> Mask:
    """A hard mask keeping at most `keep` of the decoder-linear parameters, by score.

    budget "joint": heads and channels compete in one greedy fill by score (scores must be
    comparable); "separate": heads fill `keep` of the head units' cost on their own, channels the
    rest. Then the heads are evened (`even_query_heads`) and priced exactly, the steps this frees
    are offered again to the best heads that fit, and the channels fill whatever is left of the
    whole budget: the result is within one step of it. scope "global": one budget over all layers
    (layers find their own sparsity); "per_layer": every layer keeps `keep` of itself. `greedy`:
    see `fill_budget` (False: one score threshold over the units, FLAP's cut).
    """
    h_cost, c_cost = space.unit_costs()
    h_costs = list(torch.split(h_cost, [space.n_head_units(l) for l in range(space.n_layers)]))
    c_costs = list(torch.split(c_cost, [space.n_channel_units(l) for l in range(space.n_layers)]))
    heads = [torch.zeros(space.n_head_units(l), dtype=torch.bool) for l in range(space.n_layers)]
    channels = [torch.zeros(space.n_channel_units(l), dtype=torch.bool) for l in range(space.n_layers)]
    groups = [list(range(space.n_layers))] if scope == "global" else [[l] for l in range(space.n_layers)]
    for layers in groups:
        dense = sum(space.layer_params(space.shapes[l], l) for l in layers)
        limit = keep * dense
        hs, hc = torch.cat([head_scores[l].double() for l in layers]), torch.cat([h_costs[l] for l in layers])
        cs, cc = torch.cat([channel_scores[l].double() for l in layers]), torch.cat([c_costs[l] for l in layers])
        if budget == "joint":
            fixed = dense - float(hc.sum()) - float(cc.sum())
            picked = fill_budget(torch.cat([hs, cs]), torch.cat([hc, cc]), limit - fixed, greedy)
            picked_h, reserved = picked[: len(hs)], float(cc[picked[len(hs):]].sum())
            if not greedy and space.granularity != "query_head":  # a pure score threshold: nothing to even out
                for l, part in zip(layers, torch.split(picked_h, [len(head_scores[l]) for l in layers])):
                    heads[l] = part
                for l, part in zip(layers, torch.split(picked[len(hs):], [len(channel_scores[l]) for l in layers])):
                    channels[l] = part
                continue
        else:
            picked_h, reserved = fill_budget(hs, hc, keep * float(hc.sum()), greedy), keep * float(cc.sum())
        for l, part in zip(layers, torch.split(picked_h, [len(head_scores[l]) for l in layers])):
            heads[l] = even_query_heads(space, l, head_scores[l], int(part.sum()))

        def room() -> float:
            return limit - sum(attention_only_params(space, l, heads[l]) for l in layers)

        _add_best_steps(space, layers, heads, head_scores, room() - reserved)
        while room() < -TOLERANCE and _drop_weakest_step(space, layers, heads, head_scores):
            pass
        chosen = fill_budget(cs, cc, room(), greedy)
        _add_best_steps(space, layers, heads, head_scores, room() - float(cc[chosen].sum()))
        for l, part in zip(layers, torch.split(chosen, [len(channel_scores[l]) for l in layers])):
            channels[l] = part
    return Mask(tuple(heads), tuple(channels))


def uniform_counts(space: PruningSpace, keep: float, dense_layers: tuple[int, ...] = ()) -> tuple[list[int], list[int]]:
    """Units to keep per layer so that every layer keeps about the same fraction of itself and the
    model at most `keep` in all: heads rounded to the nearest step (at least one), channels rounded
    down to fit the layer's rest, then the leftover budget handed out one channel at a time to the
    layers furthest below their share. `dense_layers` keep everything; the others keep less to make
    up for them (keep' = (keep P - P_dense) / (P - P_dense))."""
    total = keep * space.decoder_linear_params()
    dense_params = sum(space.layer_params(space.shapes[l], l) for l in dense_layers)
    pruned_params = space.decoder_linear_params() - dense_params
    layer_keep = max(0.0, (total - dense_params) / pruned_params) if pruned_params else 1.0
    head_counts, channel_counts, wants = [], [], []
    for l, s in enumerate(space.shapes):
        n_h, n_c, step = space.n_head_units(l), space.n_channel_units(l), head_step(space, l)
        if l in dense_layers:
            head_counts.append(n_h)
            channel_counts.append(n_c)
            wants.append(float(n_c))
            continue
        k_h = min(n_h, max(step, step * round(layer_keep * n_h / step))) if n_h else 0
        room = layer_keep * space.layer_params(s, l) - attention_only_params(space, l, _first_heads(space, l, k_h))
        want = room / space.channel_unit_cost(l) if n_c else 0.0
        head_counts.append(int(k_h))
        channel_counts.append(int(min(n_c, max(1 if n_c else 0, int(want)))) if n_c else 0)
        wants.append(want)
    pruned = [l for l in range(space.n_layers) if l not in dense_layers]

    def kept() -> float:
        return sum(_counted_params(space, l, head_counts[l], channel_counts[l]) for l in range(space.n_layers))

    while True:  # hand out the leftover, neediest layer first
        spare = total - kept()
        open_layers = [l for l in pruned if channel_counts[l] < space.n_channel_units(l)
                       and space.channel_unit_cost(l) <= spare + TOLERANCE]
        if not open_layers:
            break
        l = max(open_layers, key=lambda i: (wants[i] - channel_counts[i], -i))
        channel_counts[l] += 1
    while kept() > total + TOLERANCE:  # heads alone overshoot somewhere: take from the fullest layers
        if not _shrink_fullest(space, head_counts, channel_counts, pruned):
            break
    return head_counts, channel_counts


def _shrink_fullest(space: PruningSpace, head_counts: list[int], channel_counts: list[int],
                    layers: list[int]) -> bool:
    """Remove one channel (or, where only one is left, one head step; then the last ones) from the
    layer among `layers` that keeps the largest fraction of itself. False when nothing is left."""
    def fraction(l: int) -> float:
        return _counted_params(space, l, head_counts[l], channel_counts[l]) / space.layer_params(space.shapes[l], l)

    for floor_c, floor_h in ((1, 1), (0, 0)):
        for kind in ("channels", "heads"):
            if kind == "channels":
                candidates = [l for l in layers if channel_counts[l] > floor_c]
            else:
                candidates = [l for l in layers if head_counts[l] > floor_h * head_step(space, l)]
            if candidates:
                l = max(candidates, key=fraction)
                if kind == "channels":
                    channel_counts[l] -= 1
                else:
                    head_counts[l] -= head_step(space, l)
                return True
    return False


def _counted_params(space: PruningSpace, layer: int, k_heads: int, k_channels: int) -> float:
    """Exact parameters of a layer keeping k_heads attention units (a whole number of steps) and k_channels."""
    return attention_only_params(space, layer, _first_heads(space, layer, k_heads)) \
        + k_channels * space.channel_unit_cost(layer)


def _first_heads(space: PruningSpace, layer: int, k: int) -> Tensor:
    """Some valid head mask keeping k units (which ones does not change the cost)."""
    return even_query_heads(space, layer, -torch.arange(space.n_head_units(layer), dtype=torch.float64), k)


def uniform_mask(space: PruningSpace, head_scores: list[Tensor], channel_scores: list[Tensor], keep: float,
                 dense_layers: tuple[int, ...] = ()) -> Mask:
    """Top units per layer with the counts of `uniform_counts` (the same sparsity in every layer but
    `dense_layers`)."""
    head_counts, channel_counts = uniform_counts(space, keep, dense_layers)
    heads = tuple(even_query_heads(space, l, head_scores[l], k) for l, k in enumerate(head_counts))
    channels = tuple(top_k(channel_scores[l], k) for l, k in enumerate(channel_counts))
    return Mask(heads, channels)


def global_mask(space: PruningSpace, head_scores: list[Tensor], channel_scores: list[Tensor], keep: float,
                greedy: bool = True) -> Mask:
    """One budget over all layers and both kinds: units kept in order of (comparable) score."""
    return select_under_budget(space, head_scores, channel_scores, keep, budget="joint", scope="global", greedy=greedy)


# ---- policy gradient: expected cost of probabilities, and their hard mask --------------------------

def budget_groups(space: PruningSpace, budget: str, scope: str) -> list[tuple[Tensor, Tensor]]:
    """Index sets (into the flat head and channel vectors) that share one budget."""
    h_sizes = [space.n_head_units(l) for l in range(space.n_layers)]
    c_sizes = [space.n_channel_units(l) for l in range(space.n_layers)]
    h_off = [0, *torch.tensor(h_sizes).cumsum(0).tolist()]
    c_off = [0, *torch.tensor(c_sizes).cumsum(0).tolist()]
    empty = torch.zeros(0, dtype=torch.long)
    if scope == "global":
        layer_sets = [(torch.arange(h_off[-1]), torch.arange(c_off[-1]))]
    else:
        layer_sets = [(torch.arange(h_off[l], h_off[l + 1]), torch.arange(c_off[l], c_off[l + 1]))
                      for l in range(space.n_layers)]
    if budget == "joint":
        return layer_sets
    return [g for h, c in layer_sets for g in ((h, empty), (empty, c))]


def project_probs(space: PruningSpace, s_h: Tensor, s_c: Tensor, keep: float, budget: str, scope: str,
                  costs: tuple[Tensor, Tensor], floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """Project (s_heads, s_channels) so that each budget group keeps at most `keep` of its unit
    cost in expectation, sum c_i s_i <= keep sum c_i, with floor <= s <= 1 - floor (pg_math.project)."""
    from .pg_math import project

    c_h, c_c = costs
    out_h, out_c = s_h.clone(), s_c.clone()
    for hi, ci in budget_groups(space, budget, scope):
        s = torch.cat([s_h[hi], s_c[ci]])
        if s.numel() == 0:
            continue
        c = torch.cat([c_h[hi], c_c[ci]])
        p = project(s, keep * float(c.sum()), c, lo=floor, hi=1 - floor)
        out_h[hi], out_c[ci] = p[: len(hi)], p[len(hi):]
    return out_h, out_c


def hard_mask(space: PruningSpace, s_h: Tensor, s_c: Tensor, keep: float, budget: str, scope: str) -> Mask:
    """The deterministic mask of keep probabilities: the most probable units under the budget."""
    probs = space.unflatten(s_h, s_c)
    return select_under_budget(space, list(probs.heads), list(probs.channels), keep, budget, scope)


def achieved_ratio(space: PruningSpace, mask: Mask) -> float:
    """Fraction of decoder-linear parameters the mask removes."""
    return 1.0 - space.kept_params(mask) / space.decoder_linear_params()


def largest_step(space: PruningSpace) -> float:
    """Parameters of the largest single step a selection can take (one unit; for `query_head` one
    query head per group, with the k/v heads when they come with it): how far below the budget a
    mask may have to stay."""
    steps = [space.channel_unit_cost(l) for l in range(space.n_layers) if space.n_channel_units(l)]
    steps += [space.attention_params_keeping(l, head_step(space, l)) - space.attention_params_keeping(l, 0)
              for l in range(space.n_layers) if space.n_head_units(l)]
    return float(max(steps, default=0.0))


def budget_report(space: PruningSpace, mask: Mask, ratio: float) -> dict:
    """Target and achieved ratio; `reachable` False (with a note) when the units cannot come within
    one step of the target, e.g. block granularity on a small model, or a ratio above what they allow."""
    achieved = achieved_ratio(space, mask)
    shortfall = (achieved - ratio) * space.decoder_linear_params()  # parameters removed beyond the target
    reachable = shortfall <= largest_step(space) + TOLERANCE
    out = {"target_ratio": ratio, "achieved_ratio": achieved, "reachable": reachable}
    if not reachable:
        out["note"] = (f"the {space.granularity} units cannot reach ratio {ratio:.3f} without exceeding it: "
                       f"removed {achieved:.3f} instead (use a finer granularity)")
    return out
