//! How far a fetch from the upstream got: the bytes of the pack received and the objects
//! indexed so far, as gix reports them while it reads the pack. Whoever waits for the fetch
//! reads them (a client shown progress on band 2, the log).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use gix::progress::{Id, MessageLevel, Step, StepShared, Unit};

/// gix-pack's id of the bytes of the pack read (`bundle::write::ProgressId::ReadPackBytes`).
const READ_PACK_BYTES: Id = *b"BWRB";
/// gix-pack's id of the objects indexed as the pack is read
/// (`index::write::ProgressId::IndexObjects`).
const INDEX_OBJECTS: Id = *b"IWIO";

/// The counters of one fetch, shared by everyone who reports on it.
#[derive(Debug, Default)]
pub struct Progress {
    bytes: StepShared,
    objects: StepShared,
    /// The objects the pack holds, from its header; 0 until known.
    total: AtomicUsize,
}

/// What [`Progress`] shows at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Received {
    /// Pack bytes received.
    pub bytes: u64,
    /// Objects received.
    pub objects: u64,
    /// Objects the pack holds, once its header has arrived.
    pub total: Option<u64>,
}

impl Received {
    /// `N objects, M MiB`, or `N/T objects, M MiB` once the total is known.
    pub fn describe(&self) -> String {
        let mib = self.bytes as f64 / (1024.0 * 1024.0);
        match self.total {
            Some(total) => format!("{}/{total} objects, {mib:.2} MiB", self.objects),
            None => format!("{} objects, {mib:.2} MiB", self.objects),
        }
    }
}

impl Progress {
    /// The counters now.
    pub fn received(&self) -> Received {
        let total = self.total.load(Ordering::Relaxed);
        Received {
            bytes: self.bytes.load(Ordering::Relaxed) as u64,
            objects: self.objects.load(Ordering::Relaxed) as u64,
            total: (total > 0).then_some(total as u64),
        }
    }

    /// Start counting again, for the next fetch.
    pub fn reset(&self) {
        self.bytes.store(0, Ordering::Relaxed);
        self.objects.store(0, Ordering::Relaxed);
        self.total.store(0, Ordering::Relaxed);
    }

    /// The root of the progress tree handed to gix.
    pub(super) fn node(self: &Arc<Self>) -> Node {
        Node::new(Arc::clone(self), gix::progress::UNKNOWN)
    }
}

/// One node of gix's progress tree: the nodes with the ids of [`READ_PACK_BYTES`] and
/// [`INDEX_OBJECTS`] count into [`Progress`]; the others count into a step of their own.
pub(super) struct Node {
    progress: Arc<Progress>,
    id: Id,
    step: StepShared,
}

impl Node {
    fn new(progress: Arc<Progress>, id: Id) -> Node {
        let step = match id {
            READ_PACK_BYTES => Arc::clone(&progress.bytes),
            INDEX_OBJECTS => Arc::clone(&progress.objects),
            _ => StepShared::default(),
        };
        Node { progress, id, step }
    }
}

impl gix::Count for Node {
    fn set(&self, step: Step) {
        self.step.store(step, Ordering::Relaxed);
    }

    fn step(&self) -> Step {
        self.step.load(Ordering::Relaxed)
    }

    fn inc_by(&self, step: Step) {
        self.step.fetch_add(step, Ordering::Relaxed);
    }

    fn counter(&self) -> StepShared {
        Arc::clone(&self.step)
    }
}

impl gix::Progress for Node {
    fn init(&mut self, max: Option<Step>, _unit: Option<Unit>) {
        if self.id == INDEX_OBJECTS {
            self.progress
                .total
                .store(max.unwrap_or(0), Ordering::Relaxed);
        }
    }

    fn set_name(&mut self, _name: String) {}

    fn name(&self) -> Option<String> {
        None
    }

    fn id(&self) -> Id {
        self.id
    }

    fn message(&self, _level: MessageLevel, _message: String) {}
}

impl gix::NestedProgress for Node {
    type SubProgress = Node;

    fn add_child(&mut self, _name: impl Into<String>) -> Node {
        Node::new(Arc::clone(&self.progress), gix::progress::UNKNOWN)
    }

    fn add_child_with_id(&mut self, _name: impl Into<String>, id: Id) -> Node {
        Node::new(Arc::clone(&self.progress), id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gix::{Count, NestedProgress, Progress as _};

    #[test]
    fn counts_the_pack_bytes_and_objects_gix_reports() {
        let progress = Arc::new(Progress::default());
        let mut root = progress.node();
        let mut receiving = root.add_child("receiving pack");
        let read = receiving.add_child_with_id("read pack", READ_PACK_BYTES);
        let mut indexing = receiving.add_child_with_id("indexing", INDEX_OBJECTS);
        let other = receiving.add_child_with_id("decompressing", *b"IWDB");
        indexing.init(Some(10), None);
        read.inc_by(3 << 20);
        read.counter().fetch_add(1 << 19, Ordering::Relaxed);
        indexing.inc();
        indexing.inc_by(2);
        other.inc_by(1000);
        let received = progress.received();
        assert_eq!(
            received,
            Received {
                bytes: (3 << 20) + (1 << 19),
                objects: 3,
                total: Some(10)
            }
        );
        assert_eq!(received.describe(), "3/10 objects, 3.50 MiB");
        progress.reset();
        assert_eq!(progress.received().describe(), "0 objects, 0.00 MiB");
    }
}
