"""A skipped test says so where the CI log shows it: a `SKIPPED: <test>: <why>` line appended to
the file named by TPRUN_SKIP_LOG (.ci/run sets it and lists the file at its end; on CI that list
must be empty), as the Rust tests do (kernels::skips)."""

import os


def pytest_runtest_logreport(report):
    log = os.environ.get("TPRUN_SKIP_LOG")
    if report.skipped and log:
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        with open(log, "a") as f:
            f.write(f"SKIPPED: python {report.nodeid}: {why}\n")
