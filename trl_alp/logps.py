"""What TRL's shared log-prob helper does at one call site (`LogpsCall`), and the batch keys of a support table.

TRL's `GRPOTrainer._get_per_token_logps_and_entropies` serves generation scoring (the old and reference passes) and
the loss alike, with no argument telling them apart. ALP needs it to do something else at some of those sites: skip
the old pass, replay on the sampling supports, hand back what it computed. Each such site opens one `LogpsCall` around
its TRL call (`ALPGRPOTrainer._alp_logps_call`) and reads the results from it afterwards, so no state outlives the
call.
"""

from __future__ import annotations

import dataclasses

import torch

from .support import RolloutSupports

# The batch's support table under truncated sampling (`support.pack_supports`): ids, counts and log covers.
SUPPORT_KEYS = ("alp_support_ids", "alp_support_counts", "alp_support_cover")


@dataclasses.dataclass
class LogpsCall:
    """What TRL's shared log-prob helper, `_get_per_token_logps_and_entropies`, does at one call site.

    Attributes:
        skip_old: TRL's no-grad "old" pass returns ``None`` ("not computed": ALP and Bypass do not need it), once.
        table: The batch's sampling-support table (truncated sampling): every pass replays on it.
        rollout: The generation batch's rollout supports, set by `_generate` while TRL scores that batch: its old and
            reference passes replay on them.
        logps: The log-probs the last pass returned (the loss forward's, under ``correction="grpo"``).
        unreplayed_logps: The last replayed pass's log-probs before the replay (over the whole vocabulary).
    """

    skip_old: bool = False
    table: tuple[torch.Tensor, ...] | None = None
    rollout: RolloutSupports | None = None
    logps: torch.Tensor | None = None
    unreplayed_logps: torch.Tensor | None = None

    def support(self, width: int) -> tuple[torch.Tensor, ...] | None:
        """The support table a pass of `width` completion tokens replays on, or `None`."""
        if self.table is not None:
            return self.table
        return self.rollout.table(width) if self.rollout is not None else None
