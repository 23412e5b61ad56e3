#!/usr/bin/env bash
# Keeps the docs from drifting away from the code. Run from the repository root
# with the debug binaries built (`cargo build --bin warren-producer --bin
# warren-consumer`). Checks:
#
#   links     every relative link in README.md, docs/*.md and deploy/README.md
#             points to an existing file, and every #anchor into a markdown file
#             to an existing heading (GitHub's slug rules)
#   commands  every `warren-producer ...` / `warren-consumer ...` command the docs
#             show (lines of fenced code blocks, and inline code) names real
#             subcommands, `--help` of that subcommand succeeds, and every --flag
#             shown appears in that subcommand's --help
#   scripts   every `bash deploy/<script>` mentioned exists
#
# Prints one line per failure and ends with "docs checks: N passed, N failed";
# exits 1 when anything failed, 2 when it cannot run at all. DOCS_CHECK_VERBOSE=1
# also lists every command it checked.
set -uo pipefail
cd "$(dirname "$0")/../.."

# The debug binaries where cargo put them (CARGO_TARGET_DIR included).
target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN_DIR=${DOCS_CHECK_BIN_DIR:-${target_dir:-${CARGO_TARGET_DIR:-target}}/debug}
for bin in warren-producer warren-consumer; do
  if [ ! -x "$BIN_DIR/$bin" ]; then
    echo "docs-check: $BIN_DIR/$bin is missing; build it first (cargo build --bin $bin)" >&2
    exit 2
  fi
done
if ! command -v python3 >/dev/null; then
  echo "docs-check: python3 is needed" >&2
  exit 2
fi

# The markdown parsing is in Python: bash regexes cannot follow code fences,
# inline code and link syntax without being wrong somewhere.
exec python3 - "$BIN_DIR" README.md docs/*.md deploy/README.md <<'PY'
import os
import re
import shlex
import subprocess
import sys
import unicodedata

bin_dir, files = sys.argv[1], sys.argv[2:]
verbose = os.environ.get("DOCS_CHECK_VERBOSE") == "1"  # also list the commands checked
BINARIES = ("warren-producer", "warren-consumer")
passed = 0
failed = 0


def ok():
    global passed
    passed += 1


def fail(where, msg):
    global failed
    failed += 1
    print(f"FAIL {where}: {msg}")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")


FENCE = re.compile(r"^\s*(```|~~~)")


def split_blocks(lines):
    """Yields (line number, text, in_code_block) for every line."""
    in_code = False
    for n, line in enumerate(lines, 1):
        if FENCE.match(line):
            yield n, line, True
            in_code = not in_code
            continue
        yield n, line, in_code


# ---------------------------------------------------------------- headings
def slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation
    dropped (letters, digits, spaces, `-` and `_` kept), spaces to `-`."""
    text = heading.strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    out = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            out.append("-" if ch == " " else ch)
    return "".join(out)


anchor_cache = {}


def anchors(path):
    if path not in anchor_cache:
        seen = {}
        result = set()
        for _, line, code in split_blocks(read(path)):
            m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if code or not m:
                continue
            s = slug(m.group(2))
            if s in seen:
                seen[s] += 1
                result.add(f"{s}-{seen[s]}")
            else:
                seen[s] = 0
                result.add(s)
        anchor_cache[path] = result
    return anchor_cache[path]


# ---------------------------------------------------------------- links
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def check_links(path, lines):
    base = os.path.dirname(path)
    for n, line, code in split_blocks(lines):
        if code:
            continue
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group(1)
            where = f"{path}:{n}"
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # http:, https:, mailto: — not ours to check offline
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(base, file_part)) if file_part else path
            if not os.path.exists(dest):
                fail(where, f"link `{target}`: {dest} does not exist")
                continue
            if anchor and dest.endswith(".md"):
                if anchor not in anchors(dest):
                    fail(where, f"link `{target}`: no heading `#{anchor}` in {dest}")
                    continue
            ok()


# ---------------------------------------------------------------- commands
help_cache = {}


def run_help(binary, path):
    key = (binary, tuple(path))
    if key not in help_cache:
        argv = [os.path.join(bin_dir, binary), *path, "--help"]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                               env={**os.environ, "NO_COLOR": "1"})
            help_cache[key] = (p.returncode, p.stdout + p.stderr)
        except (OSError, subprocess.TimeoutExpired) as e:
            help_cache[key] = (-1, str(e))
    return help_cache[key]


def subcommands(help_text):
    """Names listed under clap's `Commands:` heading."""
    names, in_section = set(), False
    for line in help_text.split("\n"):
        if re.match(r"^\S.*:$", line):
            in_section = line.strip() == "Commands:"
            continue
        m = re.match(r"^\s{2}(\S+)", line)
        if in_section and m:
            names.add(m.group(1))
    return names


def flags_of(help_text):
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", help_text))


def command_lines(lines):
    """(line number, text) of each documented invocation of a binary."""
    out = []
    for n, line, code in split_blocks(lines):
        if FENCE.match(line):
            continue
        if code:
            text = re.sub(r"^\s*\$\s+", "", line)
            # Leading VAR=value assignments and a path to the binary are fine.
            text = re.sub(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S+\s+)*", "", text)
            if re.match(r"^(?:\S*/)?warren-(producer|consumer)(\s|$)", text):
                out.append((n, text))
        else:
            for m in re.finditer(r"`((?:\S*/)?warren-(?:producer|consumer)(?:\s[^`]*)?)`", line):
                out.append((n, m.group(1)))
    return out


def tokens(text):
    text = text.replace("\\|", " | ")
    # A comment ends the command; so do redirections and pipes.
    text = re.split(r"\s#\s|\s#$", text)[0]
    try:
        toks = shlex.split(text, posix=True)
    except ValueError:
        toks = text.split()
    out = []
    for t in toks:
        if t in ("<", ">", ">>", "|", "&&", ";") or (
            t.startswith(("<", ">")) and not t.endswith(">")  # `<task>` is a placeholder
        ):
            if t == "|":
                continue  # alternatives in a synopsis: `--delay 90s | --at T`
            break
        out.append(t.strip("[]()"))
    return [t for t in out if t]


VALUE_FLAGS = {"--config", "-c"}


def check_command(path, n, text):
    toks = tokens(text)
    binary = os.path.basename(toks[0])
    if binary not in BINARIES:
        return
    where = f"{path}:{n}"
    sub, shown_flags, positional_seen = [], [], False
    code, help_text = run_help(binary, sub)
    if code != 0:
        fail(where, f"`{binary} --help` failed ({code})")
        return
    i = 1
    while i < len(toks):
        t = toks[i]
        if t in ("…", "..."):
            pass  # "warren-producer …": any subcommand
        elif t.startswith("--"):
            flag = t.split("=", 1)[0]
            shown_flags.append(flag)
            if flag in VALUE_FLAGS and "=" not in t:
                i += 1
        elif t == "-c":
            i += 1
        elif not positional_seen and subcommands(help_text) and not t.startswith("-"):
            # Neither binary takes a positional argument where it has subcommands.
            if t not in subcommands(help_text):
                fail(where, f"`{binary} {' '.join(sub)}` has no subcommand `{t}`")
                return
            sub.append(t)
            code, help_text = run_help(binary, sub)
            if code != 0:
                fail(where, f"`{binary} {' '.join(sub)} --help` failed ({code})")
                return
        elif not t.startswith("-"):
            positional_seen = True
        i += 1
    # A command that stops at a group (`warren-consumer dead`) is fine; its
    # --help ran above.
    ok()
    if verbose:
        print(f"ok   {where}: {binary} {' '.join(sub)} {' '.join(dict.fromkeys(shown_flags))}")
    known = flags_of(help_text)
    for flag in dict.fromkeys(shown_flags):
        if flag == "--help":
            continue
        if flag in known:
            ok()
        else:
            fail(where, f"`{binary} {' '.join(sub)}` has no flag {flag} (not in its --help)")


# ---------------------------------------------------------------- scripts
SCRIPT = re.compile(r"\bbash\s+(deploy/[A-Za-z0-9_./-]+\.sh)")


def check_scripts(path, lines):
    for n, line, _ in split_blocks(lines):
        for m in SCRIPT.finditer(line):
            if os.path.isfile(m.group(1)):
                ok()
            else:
                fail(f"{path}:{n}", f"`bash {m.group(1)}`: no such script")


for path in files:
    if not os.path.isfile(path):
        fail(path, "documentation page missing")
        continue
    lines = read(path)
    check_links(path, lines)
    for n, text in command_lines(lines):
        check_command(path, n, text)
    check_scripts(path, lines)

print(f"docs checks: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
