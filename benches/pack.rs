//! Phase benchmarks: request parsing, object planning, pack writing, and what a request reads
//! from a mirror's snapshot (`ls-refs`) or rebuilds after a sync (the snapshot itself).
//!
//! Fixtures are built with `fixtures/make-fixture.py` into a temporary directory, or taken from
//! `target/bench-fixtures/NAME.git` where `scripts/bench` left them. `BENCH_FIXTURES` picks the
//! pack fixtures (default `basic,large`; `huge` is the 415k-object one) and `REFS_FIXTURE` the
//! ref-heavy one (default `many-refs`; `pullrefs` has 5,001 refs).
//! Run with `cargo bench --bench pack`, e.g. `BENCH_FIXTURES=huge REFS_FIXTURE=pullrefs`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gix::ObjectId;
use smart_git_proxy::mirror::maintain;
use smart_git_proxy::pack::{self, Plan, Selection, WriteOptions};
use smart_git_proxy::protocol::{pktline, v0, v2};
use smart_git_proxy::{repo, upload_pack};

/// A fixture built for this process (the temporary directory lives as long as it does), or one
/// `scripts/bench` built.
struct Fixture {
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

fn build_fixture(name: &str) -> Fixture {
    let cached =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-fixtures/{name}.git"));
    if cached.join("objects").is_dir() {
        return Fixture {
            _dir: None,
            path: cached,
        };
    }
    let dir = tempfile::tempdir().expect("temp dir for fixtures");
    let home = dir.path().join("home");
    std::fs::create_dir(&home).expect("temp HOME");
    let path = dir.path().join(format!("{name}.git"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/make-fixture.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(name)
        .arg(&path)
        .env("HOME", &home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("LC_ALL", "C")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "fixture {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Fixture {
        _dir: Some(dir),
        path,
    }
}

/// The fixture names in environment variable `var`, comma-separated, or `default`.
fn fixture_names(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The targets of all refs, deduplicated: what a full clone wants.
fn all_tips(repo: &gix::Repository) -> Vec<ObjectId> {
    let mut tips: Vec<ObjectId> = repo::list_refs(repo)
        .expect("list refs")
        .refs
        .into_iter()
        .map(|r| r.target)
        .collect();
    tips.sort_unstable();
    tips.dedup();
    tips
}

/// `rev~n`, following first parents.
fn nth_first_parent(repo: &gix::Repository, rev: &str, n: usize) -> ObjectId {
    let mut id = repo
        .find_reference(rev)
        .expect("ref exists")
        .peel_to_id()
        .expect("ref peels")
        .detach();
    for _ in 0..n {
        let commit = repo.find_commit(id).expect("commit");
        id = commit.parent_ids().next().expect("has a parent").detach();
    }
    id
}

/// A stateless v0 request body: one want with a typical capability list, `haves` have lines
/// (synthetic ids), then `done`.
fn v0_request(haves: usize) -> Vec<u8> {
    let mut out = Vec::new();
    pktline::text(
        &mut out,
        "want 1111111111111111111111111111111111111111 multi_ack_detailed no-done side-band-64k \
         thin-pack ofs-delta include-tag agent=git/2.47.3",
    );
    pktline::flush(&mut out);
    for i in 0..haves as u64 {
        let hex = format!(
            "{:016x}{:016x}{:08x}",
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            !i,
            i as u32
        );
        pktline::text(&mut out, &format!("have {hex}"));
    }
    pktline::text(&mut out, "done");
    out
}

fn plan_for(db: &pack::Db, wants: &[ObjectId], common: &[ObjectId]) -> Plan {
    let sel = Selection {
        wants,
        common,
        ..Default::default()
    };
    pack::plan(db, &sel, &AtomicBool::new(false)).expect("plan")
}

fn clone_plan(plan: &Plan) -> Plan {
    plan.clone()
}

fn write_opts() -> WriteOptions {
    WriteOptions {
        ofs_delta: true,
        ..Default::default()
    }
}

fn bench_parse(c: &mut Criterion) {
    let body = v0_request(10_000);
    let mut g = c.benchmark_group("parse");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("v0/10k-haves", |b| {
        b.iter(|| {
            let req = v0::parse(black_box(&body))
                .expect("parses")
                .expect("has wants");
            assert_eq!(req.haves.len(), 10_000);
            req
        })
    });
    g.finish();
}

/// An open fixture and its full-clone plan. Plans hold pack locations that are only valid for
/// the database handle that made them, so planning and writing share one handle.
struct Opened {
    name: String,
    repo: gix::Repository,
    db: pack::Db,
    wants: Vec<ObjectId>,
    full: Plan,
}

fn bench_pack(c: &mut Criterion) {
    let fixtures: Vec<(String, Fixture)> = fixture_names("BENCH_FIXTURES", "basic,large")
        .into_iter()
        .map(|name| {
            let fixture = build_fixture(&name);
            (name, fixture)
        })
        .collect();
    let opened: Vec<Opened> = fixtures
        .iter()
        .map(|(name, fixture)| {
            let repo = repo::open(&fixture.path).expect("open fixture");
            let db = pack::db(&repo);
            let wants = all_tips(&repo);
            let full = plan_for(&db, &wants, &[]);
            eprintln!(
                "{name}: full clone plan: {} objects ({} commits, {} trees, {} blobs, {} tags)",
                full.stats.total(),
                full.stats.commits,
                full.stats.trees,
                full.stats.blobs,
                full.stats.tags
            );
            Opened {
                name: name.clone(),
                repo,
                db,
                wants,
                full,
            }
        })
        .collect();
    let interrupt = AtomicBool::new(false);

    // The commit walk alone: what a commit-graph could speed up (commits read from the
    // graph instead of inflated from the pack).
    let mut g = c.benchmark_group("walk");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(500));
    for o in &opened {
        g.throughput(Throughput::Elements(o.full.stats.commits as u64));
        // Through the commit-graph when the fixture has one, and through the objects.
        eprintln!(
            "{}: commit-graph {}",
            o.name,
            pack::graph::open(&o.db).map_or("absent".into(), |g| format!(
                "with {} commits",
                g.num_commits()
            ))
        );
        for graph in [true, false] {
            let name = if graph {
                "all-commits"
            } else {
                "all-commits-objects"
            };
            g.bench_function(format!("{}/{name}", o.name), |b| {
                b.iter(|| {
                    let db = pack::db(&o.repo);
                    let mut commits = if graph {
                        pack::walk::Commits::new(&db, Default::default())
                    } else {
                        pack::walk::Commits::without_graph(&db)
                    };
                    let tips: Vec<ObjectId> = o
                        .wants
                        .iter()
                        .filter_map(|w| commits.peel_to_commit(*w).ok().flatten())
                        .collect();
                    pack::walk::walk(&mut commits, black_box(&tips), &[], None, &interrupt)
                        .expect("walk")
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("plan");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(500));
    for o in &opened {
        g.throughput(Throughput::Elements(o.full.stats.total() as u64));
        // A fresh handle per iteration, as each request gets: its delta-base cache starts cold.
        g.bench_function(format!("{}/full", o.name), |b| {
            b.iter(|| plan_for(&pack::db(&o.repo), black_box(&o.wants), &[]))
        });
        if o.name != "basic" {
            let main = nth_first_parent(&o.repo, "refs/heads/main", 0);
            let base = nth_first_parent(&o.repo, "refs/heads/main", 50);
            let incr = plan_for(&o.db, &[main], &[base]);
            eprintln!(
                "{}: main~50..main plan: {} objects",
                o.name,
                incr.stats.total()
            );
            g.throughput(Throughput::Elements(incr.stats.total() as u64));
            g.bench_function(format!("{}/incremental-50", o.name), |b| {
                b.iter(|| plan_for(&pack::db(&o.repo), black_box(&[main]), black_box(&[base])))
            });
        }
    }
    g.finish();

    // The same plans on a maintained copy (one pack, with the bitmap maintenance writes),
    // walked and from the bitmap.
    let mut g = c.benchmark_group("plan-bitmap");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(500));
    for (name, fixture) in &fixtures {
        let dir = tempfile::tempdir().expect("temp dir");
        let copy = dir.path().join("m.git");
        let status = Command::new("cp")
            .arg("-r")
            .arg(&fixture.path)
            .arg(&copy)
            .status()
            .expect("cp runs");
        assert!(status.success());
        let started = std::time::Instant::now();
        let outcome = maintain::consolidate(&copy, Duration::from_secs(3600), None, &interrupt)
            .expect("maintenance");
        eprintln!(
            "{name}: maintenance with bitmap: {:?}, {} bitmapped commits",
            started.elapsed(),
            outcome.bitmap_commits
        );
        let pack_path = maintain::packs(&copy).expect("packs")[0].clone();
        let bitmap_path = pack_path.with_extension("bitmap");
        {
            let repo = repo::open(&copy).expect("open copy");
            let refs = repo::list_refs(&repo).expect("list refs").refs;
            let (preferred, other): (Vec<_>, Vec<_>) = refs
                .iter()
                .partition(|r| pack::reuse::is_clone_ref(&r.name));
            let preferred: Vec<ObjectId> = preferred.iter().map(|r| r.target).collect();
            let other: Vec<ObjectId> = other.iter().map(|r| r.target).collect();
            let tips = pack::bitmap::Tips {
                preferred: &preferred,
                other: &other,
            };
            let started = std::time::Instant::now();
            let written = pack::bitmap::write(&pack::db(&repo), &pack_path, tips, None, &interrupt)
                .expect("bitmap");
            eprintln!(
                "{name}: the bitmap alone: {:?}, {} commits ({} XORed), {} bytes",
                started.elapsed(),
                written.commits,
                written.xored,
                written.bytes
            );
        }
        let index = Arc::new(pack::bitmap::Index::open(&bitmap_path).expect("bitmap"));
        let repo = repo::open(&copy).expect("open copy");
        let wants = all_tips(&repo);
        let plan =
            |bitmap: Option<&Arc<pack::bitmap::Index>>, wants: &[ObjectId], common: &[ObjectId]| {
                let sel = Selection {
                    wants,
                    common,
                    bitmap,
                    ..Default::default()
                };
                pack::plan(&pack::db(&repo), &sel, &interrupt).expect("plan")
            };
        // `-cold`: nothing of the bitmap decoded yet (a mirror whose decoded bitmaps left the
        // cache): the reverse index, the type bitmaps and the commit bitmaps are decoded.
        let cold = || {
            let cache = Arc::new(pack::bitmap::Cache::new(pack::bitmap::CACHE_BYTES));
            Arc::new(pack::bitmap::File::open_in(&bitmap_path, cache).expect("bitmap"))
        };
        let load = |file: Arc<pack::bitmap::File>| Arc::new(file.try_load().expect("bitmap"));
        for (label, bitmap) in [("walk", None), ("bitmap", Some(&index))] {
            g.bench_function(format!("{name}/full-{label}"), |b| {
                b.iter(|| plan(bitmap, black_box(&wants), &[]))
            });
        }
        g.bench_function(format!("{name}/full-bitmap-cold"), |b| {
            b.iter_batched(
                cold,
                |file| plan(Some(&load(file)), black_box(&wants), &[]),
                BatchSize::PerIteration,
            )
        });
        if name != "basic" {
            let main = nth_first_parent(&repo, "refs/heads/main", 0);
            let base = nth_first_parent(&repo, "refs/heads/main", 50);
            for (label, bitmap) in [("walk", None), ("bitmap", Some(&index))] {
                g.bench_function(format!("{name}/incremental-50-{label}"), |b| {
                    b.iter(|| plan(bitmap, black_box(&[main]), black_box(&[base])))
                });
            }
            g.bench_function(format!("{name}/incremental-50-bitmap-cold"), |b| {
                b.iter_batched(
                    cold,
                    |file| plan(Some(&load(file)), black_box(&[main]), black_box(&[base])),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("write");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(500));
    for o in &opened {
        let stats = pack::write(
            o.db.clone(),
            clone_plan(&o.full),
            std::io::sink(),
            write_opts(),
            &interrupt,
        )
        .expect("write");
        eprintln!(
            "{}: full pack: {} objects, {} deltas, {} bytes",
            o.name, stats.objects, stats.deltas, stats.bytes
        );
        g.throughput(Throughput::Bytes(stats.bytes));
        g.bench_function(format!("{}/full", o.name), |b| {
            b.iter_batched(
                || clone_plan(&o.full),
                |plan| {
                    pack::write(
                        o.db.clone(),
                        plan,
                        std::io::sink(),
                        write_opts(),
                        &interrupt,
                    )
                    .expect("write")
                },
                BatchSize::PerIteration,
            )
        });
        if o.name != "basic" {
            // A fetch 50 commits behind on the walk path (no bitmap): a thin pack, with deltas
            // made anew against the client's version of each path.
            let main = nth_first_parent(&o.repo, "refs/heads/main", 0);
            let base = nth_first_parent(&o.repo, "refs/heads/main", 50);
            let thin_plan = || {
                let sel = Selection {
                    wants: &[main],
                    common: &[base],
                    thin: true,
                    ..Default::default()
                };
                pack::plan(&o.db, &sel, &interrupt).expect("plan")
            };
            let stats = pack::write(
                o.db.clone(),
                thin_plan(),
                std::io::sink(),
                write_opts(),
                &interrupt,
            )
            .expect("write");
            eprintln!(
                "{}: main~50..main thin pack: {} objects, {} deltas ({} thin), {} bytes",
                o.name, stats.objects, stats.deltas, stats.thin_deltas, stats.bytes
            );
            g.throughput(Throughput::Bytes(stats.bytes));
            g.bench_function(format!("{}/incremental-50-thin", o.name), |b| {
                b.iter_batched(
                    thin_plan,
                    |plan| {
                        pack::write(
                            o.db.clone(),
                            plan,
                            std::io::sink(),
                            write_opts(),
                            &interrupt,
                        )
                        .expect("write")
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

/// What only changes at sync: building a mirror's snapshot, and answering `ls-refs` from it.
fn bench_snapshot(c: &mut Criterion) {
    let name = fixture_names("REFS_FIXTURE", "many-refs")
        .pop()
        .unwrap_or_else(|| "many-refs".into());
    let fixture = build_fixture(&name);
    let snapshot = repo::Snapshot::open(&fixture.path, None).expect("snapshot");
    let refs = snapshot.refs().refs.len();
    eprintln!("{name}: {refs} refs");
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Elements(refs as u64));
    g.bench_function(format!("{name}/open-cold"), |b| {
        b.iter(|| repo::Snapshot::open(black_box(&fixture.path), None).expect("snapshot"))
    });
    g.bench_function(format!("{name}/rebuild-after-sync"), |b| {
        b.iter(|| {
            repo::Snapshot::open(black_box(&fixture.path), Some(&snapshot)).expect("snapshot")
        })
    });
    g.bench_function(format!("{name}/is-current"), |b| {
        b.iter(|| {
            snapshot
                .is_current(black_box(&fixture.path))
                .expect("reads")
        })
    });
    let clone_args = v2::LsRefs {
        symrefs: true,
        peel: true,
        unborn: true,
        prefixes: vec!["HEAD".into(), "refs/heads/".into(), "refs/tags/".into()],
    };
    g.bench_function(format!("{name}/ls-refs-heads-and-tags"), |b| {
        b.iter(|| upload_pack::ls_refs(&snapshot, black_box(&clone_args)))
    });
    g.bench_function(format!("{name}/ls-refs-all"), |b| {
        b.iter(|| upload_pack::ls_refs(&snapshot, black_box(&v2::LsRefs::default())))
    });
    g.finish();
}

criterion_group!(benches, bench_parse, bench_pack, bench_snapshot);
criterion_main!(benches);
