"""`python -m mpoe.models.export` is now `python -m mpoe.tools.export`; this alias stays for one release."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("mpoe.tools.export", run_name="__main__")
