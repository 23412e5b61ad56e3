#!/usr/bin/env python3
"""Group a `perf record -a` profile's samples of one program by where they go.

    python3 bench/perf-buckets.py PERF.DATA PROGRAM [TOP]

PROGRAM is the executable's file name (warren-consumer, warren-producer): every
process that has a sample in it counts, its shared libraries and kernel time
included. Prints each group's share of those samples, then the TOP symbols.
The groups are by symbol name, so they are approximate: read them with the
symbols under them (docs/benchmarks.md, "Where the client CPU goes").
"""
import sys, subprocess, collections, re
data, exe = sys.argv[1], sys.argv[2]
out = subprocess.run(['perf','script','-i',data,'-F','pid,ip,sym,dso'],capture_output=True,text=True).stdout
rows=[]
for line in out.splitlines():
    m=re.match(r'\s*(\d+)\s+[0-9a-f]+\s+(.*?)\s+\(([^()]*)\)\s*$', line)
    if not m: continue
    pid,sym,dso=m.group(1),m.group(2),m.group(3)
    rows.append((pid,sym,dso))
pids={p for p,s,d in rows if d.endswith('/'+exe)}
cats=collections.Counter(); syms=collections.Counter()
def cat(sym,dso):
    s=sym
    if 'kernel' in dso or dso.startswith('[k'): return 'kernel (TCP, futex, scheduling)'
    if s.startswith(('mi_','_mi_')) or 'mimalloc' in s or '__rust_alloc' in s or '__rust_dealloc' in s or 'rust_no_alloc' in s or 'realloc' in s: return 'allocation (mimalloc)'
    if 'amq_protocol' in s or 'nom::' in s or 'cookie_factory' in s or ('parse' in s and 'lapin' in s): return 'AMQP frame parsing / serialising (amq_protocol, nom)'
    if 'lapin' in s or 'flume' in s or 'event_listener' in s or 'async_rs' in s: return 'lapin (channels, consumers, acks, promises)'
    if 'tokio' in s: return 'tokio (tasks, timers, sync)'
    if 'serde_json' in s or 'serde' in s: return 'serde_json (envelope)'
    if 'prometheus' in s: return 'prometheus metrics'
    if 'warren' in s: return 'warren code'
    if 'chrono' in s or 'clock_gettime' in s or 'Timespec' in s or 'Instant' in s: return 'time reads'
    if 'libc' in dso or 'ld-linux' in dso or 'vdso' in dso: return 'libc (memcpy, syscalls)'
    if 'core::' in s or 'alloc::' in s or 'std::' in s: return 'Rust std (hashing, fmt, Arc)'
    return 'other'
tot=0
for p,s,d in rows:
    if p in pids:
        tot+=1; c=cat(s,d); cats[c]+=1; syms[(c,s[:90])]+=1
print('samples',tot,'pids',len(pids))
for c,n in cats.most_common(): print(f'{100*n/tot:5.1f}%  {c}')
print()
for (c,s),n in syms.most_common(int(sys.argv[3]) if len(sys.argv)>3 else 40): print(f'{100*n/tot:5.1f}%  [{c[:12]}] {s}')
