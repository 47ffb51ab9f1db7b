"""The decoding runtime: the target, drafters, the round (host and device forms) and the driver."""

from .drafters import Drafter, HeadDrafter, OracleDrafter, candidates
from .generator import MODES, SpeculativeGenerator
from .results import GenerationOutput, GenerationStats, TokenStream, stop_tokens
from .rounds import ROUND_PHASES, DeviceRound, HostRound, Round
from .target import Target

__all__ = [
    "MODES",
    "ROUND_PHASES",
    "DeviceRound",
    "Drafter",
    "GenerationOutput",
    "GenerationStats",
    "HeadDrafter",
    "HostRound",
    "OracleDrafter",
    "Round",
    "SpeculativeGenerator",
    "Target",
    "TokenStream",
    "candidates",
    "stop_tokens",
]
