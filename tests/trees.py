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
