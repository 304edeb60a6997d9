//! The answer's framing and the pack: errors turned into `ERR` packets or band 3, the pack
//! section's start, and the pack itself — planned and written, copied from the pack cache, or
//! the reused region of a consolidated pack.

use std::io::{self, Write};
use std::sync::atomic::Ordering;

use gix::ObjectId;

use super::*;

/// Run `serve`; if it fails, tell the client: with an `ERR` packet before the pack started, on
/// sideband 3 inside it (unless the failure was writing to the client).
pub(super) fn respond<W: Write>(
    out: W,
    ctx: &Context<'_>,
    serve: impl FnOnce(&mut Response<W>) -> Result<Outcome, Error>,
) -> Result<Outcome, Error> {
    let mut out = Response {
        out,
        pack_started: ctx.preamble_sent,
        band_errors: ctx.preamble_sent,
    };
    let result = serve(&mut out);
    if let Err(e) = &result {
        let message = if ctx.limits.timed_out.load(Ordering::Relaxed) {
            "upload-pack: the request took too long and was stopped".to_owned()
        } else {
            e.client_message()
        };
        let mut buf = Vec::new();
        if !out.pack_started {
            pktline::err(&mut buf, &message);
        } else if out.band_errors && !matches!(e, Error::Io(_)) {
            pktline::band(&mut buf, 3, format!("{message}\n").as_bytes());
            pktline::flush(&mut buf);
        }
        // The client may be gone; the error is returned for logging either way.
        let _ = out.out.write_all(&buf).and_then(|_| out.out.flush());
    }
    result
}

/// The response stream, remembering how far it got.
pub(super) struct Response<W> {
    out: W,
    /// Pack data (or what directly precedes it) was sent: no more `ERR` packets.
    pack_started: bool,
    /// The pack travels on a sideband, so errors can go on band 3.
    band_errors: bool,
}

impl<W: Write> Write for Response<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// `shallow <oid>` and `unshallow <oid>` lines, without a trailing newline as git writes them:
/// libgit2 rejects these lines with one ("invalid packet line").
pub(super) fn write_shallow_lines(out: &mut Vec<u8>, shallow: &Shallow) {
    for id in &shallow.shallow {
        pktline::data(out, format!("shallow {id}").as_bytes());
    }
    for id in &shallow.unshallow {
        pktline::data(out, format!("unshallow {id}").as_bytes());
    }
}

/// `(tag, peeled)` for every annotated tag under `refs/tags/`, when `include-tag` was asked.
pub(super) fn include_tag_candidates(include_tag: bool, refs: &Refs) -> Vec<(ObjectId, ObjectId)> {
    if !include_tag {
        return Vec::new();
    }
    refs.refs
        .iter()
        .filter(|r| r.name.starts_with(b"refs/tags/"))
        .filter_map(|r| r.peeled.map(|p| (r.target, p)))
        .collect()
}

/// What a pack is made of, once negotiation and the shallow boundary are resolved.
pub(super) struct PackArgs {
    pub(super) wants: Vec<ObjectId>,
    pub(super) common: Vec<ObjectId>,
    pub(super) shallow: Shallow,
    pub(super) filter: Option<Filter>,
    /// `include-tag` candidates.
    pub(super) tags: Vec<(ObjectId, ObjectId)>,
    pub(super) ofs_delta: bool,
    /// `thin-pack`: deltas against objects the client has may go out as ref-deltas.
    pub(super) thin: bool,
    pub(super) progress: bool,
    /// Payload size of sideband packets; `None` for a raw pack.
    pub(super) sideband: Option<usize>,
}

impl PackArgs {
    /// What the pack starts from and stops at: the wants and the common haves, with what the
    /// shallow boundary adds to each.
    pub(super) fn ends(&self) -> (Vec<ObjectId>, Vec<ObjectId>) {
        let wants = self
            .wants
            .iter()
            .chain(&self.shallow.extra_wants)
            .copied()
            .collect();
        let common = self
            .common
            .iter()
            .chain(&self.shallow.extra_haves)
            .copied()
            .collect();
        (wants, common)
    }

    pub(super) fn selection<'a>(
        &'a self,
        wants: &'a [ObjectId],
        common: &'a [ObjectId],
        bitmap: Option<&'a std::sync::Arc<pack::bitmap::Index>>,
    ) -> pack::Selection<'a> {
        pack::Selection {
            wants,
            common,
            tags: &self.tags,
            shallow: &self.shallow.grafts,
            filter: self.filter.as_ref(),
            thin: self.thin,
            bitmap,
        }
    }

    pub(super) fn write_options(&self, ctx: &Context<'_>) -> pack::WriteOptions {
        pack::WriteOptions {
            ofs_delta: self.ofs_delta,
            thread_limit: ctx.options.pack_threads,
            compression: ctx.options.compression,
        }
    }

    /// The pack cache's key for this pack of `mirror`.
    pub(super) fn cache_key(
        &self,
        ctx: &Context<'_>,
        mirror: &str,
        wants: &[ObjectId],
        common: &[ObjectId],
    ) -> pack::cache::Key {
        let filter = self.filter.as_ref().map(|f| format!("{f:?}"));
        pack::cache::KeyParts {
            mirror,
            wants,
            common,
            shallow: &self.shallow.grafts,
            tags: &self.tags,
            filter: filter.as_deref(),
            ofs_delta: self.ofs_delta,
            thin: self.thin,
            compression: ctx.options.compression.level(),
        }
        .key()
    }

    /// The consolidated pack's first region, when it is exactly this pack.
    pub(super) fn reusable<'c>(
        &self,
        ctx: &'c Context<'_>,
        wants: &[ObjectId],
        common: &[ObjectId],
    ) -> Option<&'c (pack::reuse::Region, std::path::PathBuf)> {
        ctx.snapshot.clone_region().filter(|(region, path)| {
            self.ofs_delta
                && common.is_empty()
                && self.shallow.grafts.is_empty()
                && self.filter.is_none()
                && pack::reuse::tips_digest(wants) == region.tips
                // A snapshot older than the last maintenance names a pack that is gone: plan.
                && path.is_file()
        })
    }
}

/// Plan the pack, then write `preamble` (acknowledgements), the `packfile` section header in
/// v2, and the pack. Planning happens before anything is written so that a failure can still
/// be reported as an `ERR` packet.
pub(super) fn send_pack<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    preamble: Vec<u8>,
    v2: bool,
    out: &mut Response<W>,
) -> Result<Outcome, Error> {
    let (wants, common) = args.ends();
    let bitmap = ctx.snapshot.bitmap();
    let selection = args.selection(&wants, &common, bitmap.as_ref());
    let opts = args.write_options(ctx);
    let reuse = args.reusable(ctx, &wants, &common);
    if let Some((cache, mirror)) = ctx.cache {
        let key = args.cache_key(ctx, mirror, &wants, &common);
        let reader = match cache.lookup(key) {
            pack::cache::Lookup::Hit(reader) => Some((reader, "hit")),
            pack::cache::Lookup::Shared(reader) => Some((reader, "shared")),
            pack::cache::Lookup::Miss(generation, reader) => {
                generate(ctx, &selection, reuse.cloned(), opts, generation);
                Some((reader, "miss"))
            }
            pack::cache::Lookup::Bypass => None,
        };
        if let Some((reader, how)) = reader {
            // Reading a file needs no generation slot.
            drop(ctx.pack_slot.take());
            return send_cached(ctx, args, preamble, v2, out, reader, how);
        }
    }
    if let Some((region, path)) = reuse {
        match std::fs::File::open(path) {
            Ok(file) => {
                // A file read: no generation slot needed.
                drop(ctx.pack_slot.take());
                return send_reused(ctx, args, preamble, v2, out, region, file);
            }
            Err(e) => tracing::debug!(error = %e, "reusable pack gone: planning instead"),
        }
    }
    let started = std::time::Instant::now();
    let plan = match pack::plan(ctx.db, &selection, ctx.interrupt) {
        Ok(plan) => plan,
        Err(e) => return fail_before_pack(ctx, args, &preamble, v2, out, e),
    };
    begin_pack(ctx, args, preamble, v2, out)?;
    let stats = plan.stats;
    let mut sb = Sideband::new(out, args.sideband);
    if args.progress {
        sb.progress(&format!(
            "Enumerating objects: {}, done.\nCounting objects: {} ({} commits, {} trees, {} blobs, {} tags), done.\n",
            stats.total(),
            stats.total(),
            stats.commits,
            stats.trees,
            stats.blobs,
            stats.tags
        ))?;
    }
    let planned = started.elapsed();
    // On failure `respond` tells the client why the pack ends here.
    let written = pack::write(ctx.db.clone(), plan, &mut sb, opts, ctx.interrupt)?;
    if args.progress {
        sb.progress(&format!(
            "Total {} (delta {}), reused {} (delta {}), pack-reused 0\n",
            written.objects, written.deltas, written.deltas, written.deltas
        ))?;
    }
    sb.finish()?;
    tracing::debug!(?planned, written = ?started.elapsed() - planned, objects = written.objects, thin_deltas = written.thin_deltas, "pack sent");
    Ok(Outcome::Pack {
        objects: written.objects,
        bytes: written.bytes,
    })
}

/// The pack could not be made: send the acknowledgements first, so that the error is read
/// where git expects it. After the final ACK/NAK of v0 the client reads the pack, so the error
/// goes on band 3 there; `respond` writes it.
fn fail_before_pack<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    preamble: &[u8],
    v2: bool,
    out: &mut Response<W>,
    error: pack::Error,
) -> Result<Outcome, Error> {
    if !ctx.preamble_sent {
        out.write_all(preamble)?;
        if !v2 {
            out.pack_started = true;
            out.band_errors = args.sideband.is_some();
        }
    }
    Err(error.into())
}

/// Write `preamble` (unless the caller sent it) and, in v2, the `packfile` line: from here on
/// the pack follows, and errors go on band 3.
fn begin_pack<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    mut preamble: Vec<u8>,
    v2: bool,
    out: &mut Response<W>,
) -> io::Result<()> {
    if !ctx.preamble_sent {
        if v2 {
            pktline::text(&mut preamble, "packfile");
        }
        out.write_all(&preamble)?;
    }
    ctx.limits.streaming.store(true, Ordering::Relaxed);
    out.pack_started = true;
    out.band_errors = args.sideband.is_some();
    Ok(())
}

/// Send the pack `reader` reads from the cache (`how`: hit, shared or miss, for progress).
/// It waits for the generation to have planned, so that a failure to plan is still reported
/// before the pack, as [`send_pack`] does.
fn send_cached<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    preamble: Vec<u8>,
    v2: bool,
    out: &mut Response<W>,
    mut reader: pack::cache::Reader,
    how: &str,
) -> Result<Outcome, Error> {
    let objects = match reader.start(ctx.interrupt) {
        Ok(objects) => objects,
        Err(e) => return fail_before_pack(ctx, args, &preamble, v2, out, e),
    };
    begin_pack(ctx, args, preamble, v2, out)?;
    let mut sb = Sideband::new(out, args.sideband);
    if args.progress {
        sb.progress(&format!("Enumerating objects: {objects}, done.\n"))?;
    }
    let mut buf = vec![0u8; CACHED_READ_BYTES];
    let mut bytes = 0;
    loop {
        let n = reader.read(&mut buf, ctx.interrupt)?;
        if n == 0 {
            break;
        }
        sb.write_all(&buf[..n])?;
        bytes += n as u64;
    }
    if args.progress {
        sb.progress(&format!("Total {objects} (pack cache {how})\n"))?;
    }
    sb.finish()?;
    Ok(Outcome::Pack {
        objects: objects as usize,
        bytes,
    })
}

/// Send the first region of the consolidated pack (see [`pack::reuse`]).
fn send_reused<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    preamble: Vec<u8>,
    v2: bool,
    out: &mut Response<W>,
    region: &pack::reuse::Region,
    file: std::fs::File,
) -> Result<Outcome, Error> {
    begin_pack(ctx, args, preamble, v2, out)?;
    let mut sb = Sideband::new(out, args.sideband);
    if args.progress {
        sb.progress(&format!("Enumerating objects: {}, done.\n", region.objects))?;
    }
    let bytes = match pack::reuse::stream(region, file, &mut sb, ctx.interrupt) {
        Ok(bytes) => bytes,
        Err(pack::reuse::Error::Client(e)) => return Err(Error::Io(e)),
        Err(pack::reuse::Error::Pack(e)) => return Err(Error::Pack(e)),
    };
    if args.progress {
        sb.progress(&format!(
            "Total {0} (delta 0), reused {0} (delta 0), pack-reused {0}\n",
            region.objects
        ))?;
    }
    sb.finish()?;
    Ok(Outcome::Pack {
        objects: region.objects as usize,
        bytes,
    })
}

/// How much of a cached pack is read at a time (a few sideband packets).
const CACHED_READ_BYTES: usize = 256 * 1024;

/// Plan and write the pack of `selection` into `generation` on a thread of its own, which
/// takes over this request's generation slot: the request only follows the file from now on,
/// like any other request for the same pack. With `reuse`, the pack is that region instead,
/// copied: cache hits then need no trailer hashing.
fn generate(
    ctx: &Context<'_>,
    selection: &pack::Selection<'_>,
    reuse: Option<(pack::reuse::Region, std::path::PathBuf)>,
    opts: pack::WriteOptions,
    generation: pack::cache::Generation,
) {
    let slot = ctx.pack_slot.take();
    let db = ctx.db.clone();
    let wants = selection.wants.to_vec();
    let common = selection.common.to_vec();
    let tags = selection.tags.to_vec();
    let shallow = selection.shallow.to_vec();
    let filter = selection.filter.cloned();
    let thin = selection.thin;
    let bitmap = selection.bitmap.cloned();
    let span = tracing::Span::current();
    let run = move || {
        let _slot = slot;
        let _entered = span.enter();
        let selection = pack::Selection {
            wants: &wants,
            common: &common,
            tags: &tags,
            shallow: &shallow,
            filter: filter.as_ref(),
            thin,
            bitmap: bitmap.as_ref(),
        };
        // Its readers get the error; nothing more to do with it here.
        let _ = fill(&db, &selection, reuse.as_ref(), opts, generation);
    };
    if let Err(e) = std::thread::Builder::new()
        .name("pack-generation".into())
        .spawn(run)
    {
        tracing::error!(error = %e, "cannot start a pack generation thread");
    }
}

/// Plan and write the pack of `selection` into `generation` on this thread, or with `reuse`
/// copy that region instead; then finish the generation (or fail it, which its readers see).
/// Returns the number of objects.
pub(super) fn fill(
    db: &pack::Db,
    selection: &pack::Selection<'_>,
    reuse: Option<&(pack::reuse::Region, std::path::PathBuf)>,
    opts: pack::WriteOptions,
    mut generation: pack::cache::Generation,
) -> Result<usize, pack::Error> {
    let interrupt = generation.abandoned();
    let started = std::time::Instant::now();
    let result = match reuse {
        Some((region, path)) => std::fs::File::open(path)
            .map_err(pack::Error::file(format!("reusing {}", region.pack)))
            .and_then(|file| {
                match pack::reuse::stream(region, file, &mut generation, &interrupt) {
                    Ok(_) => Ok(region.objects as usize),
                    Err(pack::reuse::Error::Pack(e)) => Err(e),
                    Err(pack::reuse::Error::Client(e)) => {
                        Err(pack::Error::file("pack cache: writing a pack")(e))
                    }
                }
            }),
        None => pack::plan(db, selection, &interrupt).and_then(|plan| {
            pack::write(db.clone(), plan, &mut generation, opts, &interrupt)
                .map(|stats| stats.objects)
        }),
    };
    match result {
        Ok(objects) => {
            let len = generation.finish().inspect_err(|e| {
                tracing::warn!(error = %crate::error_chain(e), "pack cache: finishing failed");
            })?;
            tracing::debug!(objects, bytes = len, duration = ?started.elapsed(), "pack cached");
            Ok(objects)
        }
        Err(e) => {
            tracing::debug!(error = %crate::error_chain(&e), "shared pack generation failed");
            let e = std::sync::Arc::new(e);
            generation.fail(std::sync::Arc::clone(&e));
            Err(pack::Error::Shared(e))
        }
    }
}
