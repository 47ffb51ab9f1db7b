"""Random trees and accepted paths for the op tests."""

from __future__ import annotations

import torch


def random_parents(n: int, g: torch.Generator, max_depth: int | None = None) -> torch.Tensor:
    """Parents of a random tree in node order (parent[i] < i), root parent -1, depth <= max_depth."""
    parents = [-1]
    depth = [0]
    for i in range(1, n):
        while True:
            p = int(torch.randint(0, i, (1,), generator=g))
            if max_depth is None or depth[p] < max_depth:
                break
        parents.append(p)
        depth.append(depth[p] + 1)
    return torch.tensor(parents, dtype=torch.long)


def random_path(m: int, span: int, g: torch.Generator) -> torch.Tensor:
    """A strictly increasing path of m node offsets starting at 0, inside [0, span)."""
    if m == 0:
        return torch.zeros(0, dtype=torch.long)
    rest = torch.randperm(span - 1, generator=g)[: m - 1] + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), rest.sort().values])


def random_deep_parents(n: int, g: torch.Generator, max_depth: int = 32, chain: float = 0.7) -> torch.Tensor:
    """Like random_parents, but node i extends node i - 1 with probability ``chain``: deep, bushy trees."""
    parents, depth = [-1], [0]
    for i in range(1, n):
        p = i - 1 if float(torch.rand(1, generator=g)) < chain else int(torch.randint(0, i, (1,), generator=g))
        while depth[p] >= max_depth:
            p = parents[p]
        parents.append(p)
        depth.append(depth[p] + 1)
    return torch.tensor(parents, dtype=torch.long)


def visible_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` bool: node i may attend node j iff j is i or one of its ancestors (walking parents)."""
    n = parents.shape[0]
    visible = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            visible[i, j] = True
            j = int(parents[j])
    return visible
