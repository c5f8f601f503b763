# Sourced by scripts/vllm-env and scripts/deploy-tools: `tool_venv NAME LINK INSTALL_FUNCTION SPEC` makes a venv for a
# tool that cannot share .venv once per machine and links it into this checkout at LINK.
#
# The venv lives in the user's cache (RLAIFV_TOOLS_CACHE, default ~/.cache/rlaifv-tools), keyed by what decides
# its contents (NAME, SPEC: the versions it pins, the install function's text, the interpreter, constraints/cpu.txt): a fresh clone on the same
# machine (CI, a second worktree) links the one already made instead of installing gigabytes again, and a change of
# any of those makes a new one. INSTALL_FUNCTION runs with $VENV set to the new venv; the venv counts as made only
# once it returned (a stamp), and a lock keeps two checkouts from making the same one at once.
tool_venv() {
  local name=$1 link=$2 install=$3 spec=$4 python=.venv/bin/python key cache venv
  key=$(
    {
      echo "$name $spec"
      declare -f "$install"
      "$python" -c 'import sys; print(sys.version, sys.base_prefix)'
      cat constraints/cpu.txt
    } | sha256sum | cut -c1-16
  )
  cache=${RLAIFV_TOOLS_CACHE:-${XDG_CACHE_HOME:-${HOME:-$PWD}/.cache}/rlaifv-tools}
  mkdir -p "$cache" "$(dirname "$link")"
  cache=$(cd "$cache" && pwd)  # absolute: the link is read from inside .cache/
  venv=$cache/$name-$key
  (
    flock 9
    if [ ! -f "$venv/.installed" ]; then
      rm -rf "$venv"
      "$python" -m venv "$venv"
      VENV=$venv "$install"
      echo "$spec" > "$venv/.installed"
    fi
  ) 9> "$venv.lock"
  if [ -d "$link" ] && [ ! -L "$link" ]; then
    rm -rf "$link"  # a venv an earlier version of these scripts made inside the checkout
  fi
  ln -sfn "$venv" "$link.$$"
  mv -Tf "$link.$$" "$link"  # a rename: two checkouts' runs never see a half-made link
}
