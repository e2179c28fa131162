#!/usr/bin/env sh
# Print the path of a Python 3.12 interpreter, or explain how to get one and fail.
# Order: $PYTHON312, python3.12 on PATH, pyenv's versions, python3 if it is 3.12.
is312() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
for cand in "${PYTHON312:-}" "$(command -v python3.12 2>/dev/null)"; do
  if [ -n "$cand" ] && is312 "$cand"; then echo "$cand"; exit 0; fi
done
root="${PYENV_ROOT:-$HOME/.pyenv}"
if command -v pyenv >/dev/null 2>&1; then root="$(pyenv root)"; fi
for cand in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r) /usr/local/bin/python3.12 /usr/bin/python3.12 "$(command -v python3 2>/dev/null)"; do
  if is312 "$cand"; then echo "$cand"; exit 0; fi
done
echo "error: no Python 3.12 found (lerobot 0.6 needs it). Install one (for example 'pyenv install 3.12' or your OS's python3.12 package), or point PYTHON312=/path/to/python3.12 at it." >&2
exit 1
