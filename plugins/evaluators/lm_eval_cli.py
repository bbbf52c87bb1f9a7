"""``resp-lm-eval``: lm-eval's own command line, with RESP's lm-eval model ``resp`` registered and
RESP's task folder on the include path.

lm-eval finds only the models it ships (it has no plugin discovery for models), so a plain
``lm_eval --model resp`` cannot see RESP's model; this entry point is lm-eval's CLI after
``import resp_plugins.evaluators.lm_eval_model``.  Every argument is lm-eval's::

    resp-lm-eval --model resp --model_args path=runs/demo/model --tasks resp_gsm8k_cot_paper \\
        --apply_chat_template --fewshot_as_multiturn --device cpu
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import resp_plugins.evaluators.lm_eval_model  # noqa: F401  (registers the `resp` model)
    from resp_plugins.evaluators.lm_eval_tasks_config import TASKS_DIR
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]  # an explicit --include_path replaces RESP's tasks
    sys.argv = [sys.argv[0] if sys.argv else "resp-lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
