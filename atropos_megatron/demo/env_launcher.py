"""Start an Atropos environment script as ``python SCRIPT serve ...`` would, with one fix.

atroposlib 0.4.0 treats a single server config (an ``APIServerConfig`` or ``ServerBaseline``, not a
list, as many environments' ``config_init`` return) as a template: its ``ServerManager`` then ignores
``--openai.base_url`` and targets ``http://localhost:9004-9007/v1`` (or Slurm nodes). The run command
points every environment at its own inference server, so before the script runs, a single config
that names a ``base_url`` is handed to the ``ServerManager`` as a one-element list, which atroposlib
uses as given. Nothing else of the script changes: the script runs as ``__main__`` with its own directory first on
``sys.path`` and ``sys.argv`` as if started directly.

A second fix, for transformers 5: its ``apply_chat_template`` returns a dict unless told
``return_dict=False``, while atroposlib 0.4.0's ``tokenize_for_trainer`` (written for transformers 4)
takes the result as a token list and would produce garbage. That helper is given a view of the
tokenizer that answers with the token list, as transformers 4 did. And atroposlib's per-loop status
lines are shown once a minute (:func:`quiet_atroposlib_polling`).

    python -m atropos_megatron.demo.env_launcher path/to/my_env.py serve --env.group_size 8 ...
"""

from __future__ import annotations

import functools
import logging
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atropos_megatron.logs import CHATTY_LIBRARIES, RepeatLimiter


def use_configured_server_urls() -> None:
    """Patch atroposlib's ``ServerManager`` so a single config with a ``base_url`` is used as given."""
    from atroposlib.envs.server_handling import server_manager
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig

    original = server_manager.ServerManager.__init__
    if getattr(original, "_atropos_megatron_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, configs, *args, **kwargs):
        if isinstance(configs, APIServerConfig) and configs.base_url:
            configs = [configs]
        original(self, configs, *args, **kwargs)

    __init__._atropos_megatron_patched = True  # type: ignore[attr-defined]
    server_manager.ServerManager.__init__ = __init__


class TokenListChatTemplate:
    """A tokenizer whose ``apply_chat_template`` returns token ids, not a dict, when it tokenizes
    (transformers 4's contract, which atroposlib 0.4.0 relies on); everything else is the tokenizer's."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def apply_chat_template(self, conversation, *args, **kwargs):
        if kwargs.get("tokenize", True):
            kwargs.setdefault("return_dict", False)
        return self._tokenizer.apply_chat_template(conversation, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def tokenize_for_trainer_with_token_lists() -> None:
    """Patch atroposlib's ``tokenize_for_trainer`` (and its import in ``message_history_utils``)."""
    from atroposlib.utils import message_history_utils
    from atroposlib.utils import tokenize_for_trainer as module

    original = module.tokenize_for_trainer
    if getattr(original, "_atropos_megatron_patched", False):
        return

    @functools.wraps(original)
    def tokenize_for_trainer(tokenizer, *args, **kwargs):
        return original(TokenListChatTemplate(tokenizer), *args, **kwargs)

    tokenize_for_trainer._atropos_megatron_patched = True  # type: ignore[attr-defined]
    module.tokenize_for_trainer = tokenize_for_trainer
    message_history_utils.tokenize_for_trainer = tokenize_for_trainer


def quiet_atroposlib_polling() -> None:
    """atroposlib forces its environment logger to DEBUG and logs its status on every loop (ten times a
    second) and httpx a line per request: keep INFO, and each repeating line once a minute."""
    import atroposlib.envs.base  # noqa: F401 - creates (and sets the level of) the loggers below

    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name == "atroposlib" or name.startswith("atroposlib."):
            atropos_logger = logging.getLogger(name)
            if atropos_logger.level == logging.DEBUG:
                atropos_logger.setLevel(logging.INFO)
            atropos_logger.addFilter(RepeatLimiter())


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0]).resolve()
    if not script.is_file():
        raise SystemExit(f"error: environment script {script} not found")
    use_configured_server_urls()
    tokenize_for_trainer_with_token_lists()
    quiet_atroposlib_polling()
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
