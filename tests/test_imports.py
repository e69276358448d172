"""``import procpool`` is cheap: the public names load on first use (PEP 562), and the
Manager's machinery waits for the first pool. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import procpool

pytestmark = pytest.mark.timeout(60)


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


HEAVY = {"multiprocessing.managers", "psutil", "concurrent.futures.process", "procpool.pool", "procpool.manager"}


def test_import_procpool_loads_none_of_the_machinery():
    loaded = _modules_after("import procpool")
    assert not HEAVY & loaded, HEAVY & loaded
    assert {m for m in loaded if m.startswith("procpool.")} == set()


def test_a_pool_class_loads_the_pool_but_not_the_manager():
    loaded = _modules_after("from procpool import WorkerPool")
    assert "procpool.pool" in loaded
    assert not {"multiprocessing.managers", "psutil", "procpool.manager"} & loaded


def test_the_first_pool_loads_the_managers_client_but_not_multiprocessing_managers():
    # The program talks to its Manager server through procpool.manager's client (the link the
    # spawner gave it): no multiprocessing.managers, no hmac/OpenSSL for a handshake. The
    # server (procpool.lockserver) is loaded in the server's process only.
    code = (
        "import procpool\n"
        "def main():\n"
        "    with procpool.WorkerPool(min_workers=1, max_workers=1) as p:\n"
        "        assert p.submit(abs, -3).result(timeout=20) == 3\n"
        "if __name__ == '__main__':\n"
        "    main()"
    )
    loaded = _modules_after(code)
    assert "procpool.manager" in loaded
    assert not {"multiprocessing.managers", "procpool.lockserver", "hmac", "_hashlib"} & loaded


def test_every_public_name_and_submodule_resolves():
    for name in procpool.__all__:
        assert getattr(procpool, name).__name__ == name
        assert name in dir(procpool)
    assert procpool.pool.WorkerPool is procpool.WorkerPool
    assert procpool.manager.ManagerLock.__name__ == "ManagerLock"
    assert issubclass(procpool.WorkerLost, procpool.ProcpoolError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        procpool.nope  # noqa: B018
    namespace: dict = {}
    exec("from procpool import *", namespace)
    assert set(procpool.__all__) <= set(namespace)


def test_procpool_ps_loads_neither_dataclasses_nor_typing():
    """``procpool ps`` is a command people run in a loop (watch): dataclasses (with inspect)
    and typing cost it ~10 ms of a ~60 ms start, so the modules it loads use neither."""
    code = "import sys\nsys.argv = ['procpool', 'ps', '--json']\nfrom procpool.cli import main\nmain()"
    loaded = _modules_after(code)
    assert "procpool.cli.ps" in loaded and "procpool.idtable" in loaded
    assert not {"dataclasses", "typing", "inspect"} & loaded, {"dataclasses", "typing", "inspect"} & loaded


def test_the_first_workers_are_forked_before_the_manager_machinery_loads():
    # The constructor forks its first workers before it loads the Manager's machinery (and
    # before the program's server exists): neither the spawner nor they pay for it
    # (procpool.lockname), nor the server's (procpool.lockserver, loaded in the server's own
    # process after its fork).
    code = (
        "import json, procpool\n"
        "def main():\n"
        "    with procpool.WorkerPool(min_workers=1, max_workers=1) as p:\n"
        "        probe = \"sorted(m for m in ('multiprocessing.managers', 'procpool.manager', \"\n"
        "        probe += \"'procpool.lockserver', 'hmac') \"\n"
        "        probe += \"if m in __import__('sys').modules)\"\n"
        "        print(json.dumps(p.submit(eval, probe).result(timeout=20)))\n"
        "if __name__ == '__main__':\n"
        "    main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[0]) == []
