//! Protocol v2's `fetch` (and `ls-refs`, answered from the snapshot): negotiation, the
//! `acknowledgments`, `shallow-info` and `wanted-refs` sections, then the pack.

use std::io::Write;

use gix::ObjectId;

use super::response::{
    fill, include_tag_candidates, respond, send_pack, write_shallow_lines, PackArgs, Response,
};
use super::*;
use crate::protocol::v2;

/// Serve one v2 command, writing the answer to `out`.
pub(super) fn serve(
    ctx: &Context<'_>,
    req: &v2::Request,
    out: impl Write,
) -> Result<Outcome, Error> {
    respond(out, ctx, |out| match &req.command {
        v2::Command::LsRefs(args) => {
            let (buf, outcome) = ls_refs(ctx.snapshot, args);
            out.write_all(&buf)?;
            Ok(outcome)
        }
        v2::Command::Fetch(args) => fetch(ctx, args, out),
    })
}

fn fetch<W: Write>(
    ctx: &Context<'_>,
    args: &v2::Fetch,
    out: &mut Response<W>,
) -> Result<Outcome, Error> {
    match resolve(ctx, args)? {
        Step::Acks(lines, outcome) => {
            out.write_all(&lines)?;
            Ok(outcome)
        }
        Step::Pack(lines, pack_args) => send_pack(ctx, &pack_args, lines, true, out),
    }
}

/// Where a request stands after negotiation.
enum Step {
    /// Acknowledgements only: the lines to send, and what they acknowledged.
    Acks(Vec<u8>, Outcome),
    /// The lines to send before the pack (acknowledgements, shallow and wanted-refs sections),
    /// and the pack.
    Pack(Vec<u8>, Box<PackArgs>),
}

/// Negotiate a v2 fetch and resolve its shallow boundary and wanted refs.
fn resolve(ctx: &Context<'_>, args: &v2::Fetch) -> Result<Step, Error> {
    for (i, want) in args.wants.iter().enumerate() {
        pack::check_interrupt(ctx.interrupt, i + 1)?;
        if !ctx.repo.has_object(want) {
            return Err(Error::NotOurRef(*want));
        }
    }
    let refs = ctx.snapshot.refs();
    let mut wants = args.wants.clone();
    let mut wanted_refs = Vec::new();
    for name in &args.want_refs {
        let r = ctx
            .snapshot
            .find_ref(name)
            .ok_or_else(|| Error::Protocol(format!("unknown ref {name}")))?;
        wanted_refs.push((r.target, name));
        wants.push(r.target);
    }
    if wants.is_empty() {
        // git answers nothing here; an error says what is wrong with the request.
        return Err(Error::Protocol(
            "fetch: expected at least one want or want-ref line".into(),
        ));
    }
    let bitmap = ctx.snapshot.bitmap();
    let mut neg =
        Negotiator::new(ctx.repo, ctx.db, &wants, ctx.interrupt).with_bitmap(bitmap.as_ref());
    for (i, have) in args.haves.iter().enumerate() {
        pack::check_interrupt(ctx.interrupt, i + 1)?;
        neg.have(*have)?;
    }
    let mut lines = Vec::new();
    if !args.done && args.seen_haves {
        // Acknowledge every have that was new to us; `ready` when we can stop.
        pktline::text(&mut lines, "acknowledgments");
        if neg.common().is_empty() {
            pktline::text(&mut lines, "NAK");
        }
        for id in neg.common() {
            pktline::text(&mut lines, &format!("ACK {id}"));
        }
        if !neg.ok_to_give_up()? {
            pktline::flush(&mut lines);
            let common = neg.common().len();
            return Ok(Step::Acks(lines, Outcome::Acks { common }));
        }
        pktline::text(&mut lines, "ready");
        pktline::delim(&mut lines);
    }
    let common = neg.common().to_vec();
    drop(neg);
    // Section order per gitprotocol-v2 (and git's fetch-pack): shallow-info, wanted-refs.
    let shallow = if args.deepen.is_active() {
        let shallow = shallow::compute(ctx.db, refs, &wants, &args.deepen, ctx.interrupt)?;
        pktline::text(&mut lines, "shallow-info");
        write_shallow_lines(&mut lines, &shallow);
        pktline::delim(&mut lines);
        shallow
    } else {
        Shallow::default()
    };
    if !wanted_refs.is_empty() {
        write_wanted_refs(&mut lines, &wanted_refs);
    }
    let pack_args = PackArgs {
        wants,
        common,
        shallow,
        filter: args.filter.clone(),
        tags: include_tag_candidates(args.include_tag, refs),
        ofs_delta: args.ofs_delta,
        thin: args.thin_pack,
        progress: !args.no_progress,
        sideband: Some(LARGE_BAND_PAYLOAD),
    };
    Ok(Step::Pack(lines, Box::new(pack_args)))
}

/// What [`prefill_v2`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// The pack was generated into the cache.
    Generated {
        /// Objects in the pack.
        objects: usize,
    },
    /// The cache has it already, or a generation of it is under way.
    Present,
    /// The cache takes no new pack now (low on disk space, or a write failed lately).
    NoRoom,
}

/// Put the pack that the v2 fetch `args` is answered with into the pack cache (`ctx.cache`;
/// without one, [`Prefill::NoRoom`]), under the key that request looks up, generating it on
/// this thread: the client that sends the request later is served a cache hit. `args` must
/// need no negotiation (`done`, or no `have`).
pub fn prefill_v2(ctx: &Context<'_>, args: &v2::Fetch) -> Result<Prefill, Error> {
    let Some((cache, mirror)) = ctx.cache else {
        return Ok(Prefill::NoRoom);
    };
    let pack_args = match resolve(ctx, args)? {
        Step::Pack(_, pack_args) => pack_args,
        Step::Acks(..) => {
            return Err(Error::Protocol(
                "prefill: the request needs negotiation".into(),
            ))
        }
    };
    let (wants, common) = pack_args.ends();
    let generation = match cache.prefill(pack_args.cache_key(ctx, mirror, &wants, &common)) {
        pack::cache::Prefill::Present => return Ok(Prefill::Present),
        pack::cache::Prefill::NoRoom => return Ok(Prefill::NoRoom),
        pack::cache::Prefill::Generate(generation) => generation,
    };
    let bitmap = ctx.snapshot.bitmap();
    let selection = pack_args.selection(&wants, &common, bitmap.as_ref());
    let reuse = pack_args.reusable(ctx, &wants, &common).cloned();
    let opts = pack_args.write_options(ctx);
    let objects = fill(ctx.db, &selection, reuse.as_ref(), opts, generation)?;
    Ok(Prefill::Generated { objects })
}

/// What precedes the pack data of a v2 fetch that needs no acknowledgements and no shallow or
/// wanted-refs section — its `packfile` line — so that a caller may send it, and progress on
/// band 2, before the objects are there (a mirror syncing). `None` for any other fetch, and
/// when the client asked for no progress. Serve the request with
/// [`Context::preamble_sent`] then.
pub(super) fn early_preamble(f: &v2::Fetch) -> Option<Vec<u8>> {
    let eligible = (f.done || !f.seen_haves)
        && !f.no_progress
        && !f.deepen.is_active()
        && f.want_refs.is_empty();
    eligible.then(|| {
        let mut out = Vec::new();
        pktline::text(&mut out, "packfile");
        out
    })
}

/// The `wanted-refs` section: each ref a `want-ref` named, with the object it points to.
pub(super) fn write_wanted_refs(out: &mut Vec<u8>, wanted: &[(ObjectId, &gix::bstr::BString)]) {
    pktline::text(out, "wanted-refs");
    for (id, name) in wanted {
        pktline::text(out, &format!("{id} {name}"));
    }
    pktline::delim(out);
}
