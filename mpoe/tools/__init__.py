"""Tools that read run directories, above the training code: `export` (a loadable model from a run) and
`report` (`mpoe-report`). Nothing under `mpoe.models`, `mpoe.parallel` or `mpoe.train` imports them."""
