"""Every stage's config module imports without torch (the CLI builds its options from them)."""

import subprocess
import sys

CONFIG_MODULES = (
    "cai_fast.config", "cai_fast.sl_cai_config", "cai_fast.label_config", "cai_fast.judge_config",
    "cai_fast.eval_config", "cai_fast.pipeline.config", "cai_fast.train.config", "cai_fast.train",
)


def test_importing_every_config_module_leaves_torch_out():
    code = "import sys\n" + "".join(f"import {m}\n" for m in CONFIG_MODULES) + (
        "heavy = [m for m in ('torch', 'transformers', 'cai_fast.engine') if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr



def test_the_package_re_exports_its_entry_points_lazily():
    code = ("import sys, cai_fast\n"
            "assert 'torch' not in sys.modules\n"
            "for name in cai_fast.__all__:\n"
            "    assert getattr(cai_fast, name) is not None, name\n"
            "from cai_fast.engine import load_model\n"
            "assert cai_fast.load_model is load_model\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_python_loaders_take_the_command_lines_defaults():
    import inspect

    from cai_fast.engine import load_model, open_generator

    for fn in (load_model, open_generator):
        params = inspect.signature(fn).parameters
        assert (params["device"].default, params["dtype"].default) == ("auto", "auto"), fn.__name__
