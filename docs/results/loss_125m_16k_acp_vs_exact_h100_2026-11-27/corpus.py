# corpus of long documents: the .py files of one directory (package) concatenated, in name
# order, each under a "# file:" line; packages over 1 MB split at file borders; >= 32 KB kept
import json, os, random, sys, sysconfig
out_path, limit = sys.argv[1], float(sys.argv[2])
roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], "/tmp/site"} | set(p for p in sys.path if p.endswith("site-packages")))
docs = []
seen = set()
for r in roots:
    if not os.path.isdir(r):
        continue
    for d, _, fs in os.walk(r):
        d = os.path.realpath(d)
        if d in seen:
            continue
        seen.add(d)
        cur = []
        for f in sorted(fs):
            if not f.endswith(".py"):
                continue
            try:
                t = open(os.path.join(d, f), encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            cur.append(f"# file: {os.path.relpath(os.path.join(d, f), r)}\n{t}\n")
            if sum(map(len, cur)) > 1e6:
                docs.append("".join(cur)); cur = []
        if sum(map(len, cur)) >= 32e3:
            docs.append("".join(cur))
random.Random(0).shuffle(docs)
total, n = 0, 0
with open(out_path, "w") as out:
    for t in docs:
        out.write(json.dumps({"text": t}) + "\n"); total += len(t); n += 1
        if total > limit:
            break
lens = sorted(len(t) for t in docs[:n])
print(f"corpus: {n} documents, {total/1e6:.0f} MB, chars median {lens[n//2]}, p10 {lens[n//10]}, from {roots}")
