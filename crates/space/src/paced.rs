//! Asserting many demands over a run of turns, a few hundred to a record: whatever a turn
//! asserts leaves the actor when the turn ends, and the dataspace and its observers take in
//! one turn's assertions as a whole. A frontend demanding 100,000 steps in one turn would
//! have the planner see none of them until the dataspace had taken in them all, and one
//! record per step would cost the dataspace's index an assertion per step.

use std::sync::Arc;

use nixspace_protocol::build;
use syndicate::actor::{Account, Activation, AnyValue, Cap};

/// How many demands [`assert_demands`] puts in one `<demands …>` record, asserted one per
/// turn: few enough that the dataspace and the planner take one in a few milliseconds (a
/// worker's report waits behind at most one), enough that the records and turns themselves
/// cost little (`nixspace bench dispatch`: 250 per turn gave the first assignment after
/// 100,000 demands in 17–28 ms instead of 101–145 ms with 2,000).
pub const DEMANDS_PER_RECORD: usize = 250;

/// Assert `demands` at `ds`, in order, [`DEMANDS_PER_RECORD`] in one `<demands …>` record in
/// this turn and as many in one in each turn that follows, until all are asserted. The later
/// turns are charged to an account of their own (not the one of the turn that started it,
/// which may be a connection's input loop). The assertions belong to the active facet
/// (withdrawn when it stops; the demands it has not reached by then are not asserted).
pub fn assert_demands(
    t: &mut Activation,
    ds: Arc<Cap>,
    mut demands: std::vec::IntoIter<build::Demand>,
) {
    let record = build::Demands {
        demands: demands.by_ref().take(DEMANDS_PER_RECORD).collect(),
    };
    if !record.demands.is_empty() {
        ds.assert(t, &record);
    }
    if demands.len() == 0 {
        return;
    }
    let facet = t.facet_ref();
    let account = Account::new(Some(AnyValue::symbol("paced-demands")), None);
    tokio::spawn(async move {
        account.ensure_clear_funds().await;
        let again = Arc::clone(&account);
        facet.activate(&again, None, move |t| {
            assert_demands(t, ds, demands);
            Ok(())
        });
    });
}
