"""The command-line tools: lrt-export, lrt-bench, lrt-report, lrt-verify (flags -> configs)."""
