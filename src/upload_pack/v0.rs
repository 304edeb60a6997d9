//! Protocol v0/v1's `git-upload-pack` request: stateless-RPC negotiation rounds (`ACK`/`NAK`
//! in the multi-ack flavours), the shallow list, then the pack; wants must be reachable from
//! an advertised ref.

use std::io::Write;

use gix::ObjectId;

use super::response::{
    include_tag_candidates, respond, send_pack, write_shallow_lines, PackArgs, Response,
};
use super::*;
use crate::protocol::v0::{self, MultiAck};

/// Like [`super::v2::early_preamble`] for v0/v1: a final round without haves or shallow lines on a
/// sideband starts with `NAK`, then the pack.
pub(super) fn early_preamble(r: &v0::Request) -> Option<Vec<u8>> {
    let eligible = r.done
        && r.haves.is_empty()
        && !r.caps.no_progress
        && !r.deepen.is_active()
        && r.caps.sideband != v0::Sideband::None;
    eligible.then(|| {
        let mut out = Vec::new();
        pktline::text(&mut out, "NAK");
        out
    })
}

/// Serve one stateless v0/v1 request, writing the answer to `out`.
pub(super) fn serve(
    ctx: &Context<'_>,
    req: &v0::Request,
    out: impl Write,
) -> Result<Outcome, Error> {
    respond(out, ctx, |out| fetch(ctx, req, out))
}

fn fetch<W: Write>(
    ctx: &Context<'_>,
    req: &v0::Request,
    out: &mut Response<W>,
) -> Result<Outcome, Error> {
    let refs = ctx.snapshot.refs();
    check_reachable_wants(ctx, &req.wants)?;
    let caps = &req.caps;
    let mut lines = Vec::new();
    // Over stateless HTTP every round repeats the shallow request, and git's fetch-pack
    // expects the shallow list again before the acknowledgements of each round.
    let shallow = if req.deepen.is_active() {
        shallow::compute(ctx.db, refs, &req.wants, &req.deepen, ctx.interrupt)?
    } else {
        Shallow::default()
    };
    if req.deepen.deepens() {
        write_shallow_lines(&mut lines, &shallow);
        pktline::flush(&mut lines);
    }
    if req.wants_only {
        out.write_all(&lines)?;
        return Ok(Outcome::Acks { common: 0 });
    }
    let bitmap = ctx.snapshot.bitmap();
    let mut neg =
        Negotiator::new(ctx.repo, ctx.db, &req.wants, ctx.interrupt).with_bitmap(bitmap.as_ref());
    let (mut got_common, mut got_other, mut sent_ready) = (false, false, false);
    let mut last = None;
    // This follows git's get_common_commits() for one stateless round.
    for (i, have) in req.haves.iter().enumerate() {
        pack::check_interrupt(ctx.interrupt, i + 1)?;
        match neg.have(*have)? {
            Have::Missing => {
                got_other = true;
                if caps.multi_ack != MultiAck::None && neg.ok_to_give_up()? {
                    if caps.multi_ack == MultiAck::Detailed {
                        sent_ready = true;
                        pktline::text(&mut lines, &format!("ACK {have} ready"));
                    } else {
                        pktline::text(&mut lines, &format!("ACK {have} continue"));
                    }
                }
            }
            Have::Common { .. } => {
                got_common = true;
                last = Some(*have);
                match caps.multi_ack {
                    MultiAck::Detailed => pktline::text(&mut lines, &format!("ACK {have} common")),
                    MultiAck::Basic => pktline::text(&mut lines, &format!("ACK {have} continue")),
                    MultiAck::None if neg.common().len() == 1 => {
                        pktline::text(&mut lines, &format!("ACK {have}"))
                    }
                    MultiAck::None => {}
                }
            }
        }
    }
    if req.done {
        match last.filter(|_| !neg.common().is_empty()) {
            Some(last) if caps.multi_ack != MultiAck::None => {
                pktline::text(&mut lines, &format!("ACK {last}"))
            }
            Some(_) => {}
            None => pktline::text(&mut lines, "NAK"),
        }
    } else {
        if caps.multi_ack == MultiAck::Detailed
            && got_common
            && !got_other
            && neg.ok_to_give_up()?
        {
            sent_ready = true;
            if let Some(last) = last {
                pktline::text(&mut lines, &format!("ACK {last} ready"));
            }
        }
        if neg.common().is_empty() || caps.multi_ack != MultiAck::None {
            pktline::text(&mut lines, "NAK");
        }
        match last.filter(|_| caps.no_done && sent_ready) {
            Some(last) => pktline::text(&mut lines, &format!("ACK {last}")),
            None => {
                out.write_all(&lines)?;
                return Ok(Outcome::Acks {
                    common: neg.common().len(),
                });
            }
        }
    }
    let pack_args = PackArgs {
        wants: req.wants.clone(),
        common: neg.common().to_vec(),
        shallow,
        filter: req.filter.clone(),
        tags: include_tag_candidates(caps.include_tag, refs),
        ofs_delta: caps.ofs_delta,
        thin: caps.thin_pack,
        progress: !caps.no_progress,
        sideband: match caps.sideband {
            v0::Sideband::None => None,
            v0::Sideband::Small => Some(SMALL_BAND_PAYLOAD),
            v0::Sideband::Large => Some(LARGE_BAND_PAYLOAD),
        },
    };
    send_pack(ctx, &pack_args, lines, false, out)
}

/// In v0, a want must be reachable from an advertised ref (`allow-reachable-sha1-in-want`).
/// Commits are checked with a walk that hides every ref; other objects (rare: lazy fetches of
/// a partial clone forced to protocol v0) against the objects of all refs.
fn check_reachable_wants(ctx: &Context<'_>, wants: &[ObjectId]) -> Result<(), Error> {
    let snapshot = ctx.snapshot;
    let db = ctx.db;
    if wants.iter().all(|w| snapshot.is_tip(w)) {
        return Ok(());
    }
    // The bitmap answers for every kind of object, without walking every ref.
    if let Some(reachable) = snapshot.reachable(db, ctx.interrupt)? {
        return match wants.iter().find(|w| !reachable.contains(w)) {
            Some(id) => Err(Error::NotOurRef(*id)),
            None => Ok(()),
        };
    }
    let mut commits = pack::walk::Commits::new(db, Default::default());
    let (mut commit_wants, mut other_wants) = (Vec::new(), Vec::new());
    for (i, want) in wants.iter().filter(|w| !snapshot.is_tip(w)).enumerate() {
        pack::check_interrupt(ctx.interrupt, i + 1)?;
        match ctx.repo.find_header(*want).map(|h| h.kind()) {
            Ok(gix::object::Kind::Commit) => commit_wants.push(*want),
            Ok(_) => other_wants.push(*want),
            Err(_) => return Err(Error::NotOurRef(*want)),
        }
    }
    let tips: Vec<ObjectId> = snapshot.tips().copied().collect();
    if !commit_wants.is_empty() {
        let mut hidden = Vec::new();
        for tip in &tips {
            hidden.extend(commits.peel_to_commit(*tip)?);
        }
        let walked = pack::walk::walk(&mut commits, &commit_wants, &hidden, None, ctx.interrupt)?;
        let wanted: gix::hashtable::HashSet<ObjectId> = commit_wants.iter().copied().collect();
        if let Some(id) = walked.commits.iter().find(|c| wanted.contains(*c)) {
            return Err(Error::NotOurRef(*id));
        }
    }
    if !other_wants.is_empty() {
        let all = pack::plan(
            db,
            &pack::Selection {
                wants: &tips,
                ..Default::default()
            },
            ctx.interrupt,
        )?;
        let reachable: gix::hashtable::HashSet<ObjectId> =
            all.counts.iter().map(|c| c.id).collect();
        if let Some(id) = other_wants.iter().find(|w| !reachable.contains(*w)) {
            return Err(Error::NotOurRef(*id));
        }
    }
    Ok(())
}
