"""Build hook: a wheel carries paystream's migrations and the demo's SDK bundle.

db/migrations/ stays the schema's source at the top of the checkout (the project's
layout); the build copies it into the package as paystream/migrations, where
paystream.db finds it in an installed wheel.  The SDK bundle (client-sdk/dist, made by
scripts/sdk-install) goes to paystream/dev/static for `paystream dev`'s /demo.
Everything else is in pyproject.toml."""

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads db/ and client-sdk/ from the checkout itself
        package = Path(self.build_lib) / "paystream"
        migrations = sorted((ROOT / "db" / "migrations").glob("*.sql"))
        if not migrations:
            raise SystemExit("setup.py: no db/migrations/*.sql to put in the package")
        (package / "migrations").mkdir(parents=True, exist_ok=True)
        for sql in migrations:
            shutil.copy2(sql, package / "migrations" / sql.name)
        bundle = ROOT / "client-sdk" / "dist" / "paystream.min.js"
        if bundle.exists():
            (package / "dev" / "static").mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle, package / "dev" / "static" / bundle.name)
        else:
            # On stderr, where `python -m build` and `pip wheel -v` show it; `paystream dev`
            # from such a wheel says so again at start, in its log and on /demo.
            print("WARNING: setup.py: client-sdk/dist/paystream.min.js is not built (run scripts/sdk-install "
                  "first): this wheel's `paystream dev` /demo cannot follow a payment", file=sys.stderr)


setup(cmdclass={"build_py": BuildPy})
