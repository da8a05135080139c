//! Head sampling: the caller's decision kept, new traces sampled by ratio, and
//! "no" turned into "record only" when failed requests must be exported anyway.

use opentelemetry::trace::{Link, SpanContext, SpanKind, TraceContextExt, TraceId};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, SamplingResult, ShouldSample};

use super::propagation::B3Decision;

/// The sampler: keeps the caller's decision, samples new traces by ratio, and turns
/// "no" into "record only" when failed requests must be exported anyway.
#[derive(Debug, Clone)]
pub(super) struct MeshSampler {
    pub(super) ratio: f64,
    pub(super) errors: bool,
}

impl ShouldSample for MeshSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let by_ratio = || {
            Sampler::TraceIdRatioBased(self.ratio)
                .should_sample(parent, trace_id, name, kind, attributes, links)
                .decision
                == SamplingDecision::RecordAndSample
        };
        let span = parent.map(|cx| cx.span());
        let remote = span
            .as_ref()
            .map(|s| s.span_context().clone())
            .filter(SpanContext::is_valid);
        let sampled = match (parent.and_then(|cx| cx.get::<B3Decision>()), &remote) {
            (Some(B3Decision::Sample), _) => true,
            (Some(B3Decision::Deny), _) => false,
            (Some(B3Decision::Deferred), _) | (None, None) => by_ratio(),
            (None, Some(sc)) => sc.is_sampled(),
        };
        SamplingResult {
            decision: match (sampled, self.errors) {
                (true, _) => SamplingDecision::RecordAndSample,
                (false, true) => SamplingDecision::RecordOnly,
                (false, false) => SamplingDecision::Drop,
            },
            attributes: Vec::new(),
            // The caller's vendor entries travel on unchanged.
            trace_state: remote
                .map(|sc| sc.trace_state().clone())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use opentelemetry::trace::{SpanId, TraceFlags, TraceState};

    use super::*;

    fn decide(s: &MeshSampler, cx: &Context, trace: u128) -> SamplingDecision {
        s.should_sample(
            Some(cx),
            TraceId::from(trace),
            "x",
            &SpanKind::Server,
            &[],
            &[],
        )
        .decision
    }

    #[test]
    fn sampling_keeps_the_callers_decision_and_records_the_rest_for_errors() {
        let remote = |sampled: bool| {
            Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(5_u128),
                SpanId::from(6),
                if sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            ))
        };
        let none = MeshSampler {
            ratio: 0.0,
            errors: false,
        };
        let all = MeshSampler {
            ratio: 1.0,
            errors: false,
        };
        let errors = MeshSampler {
            ratio: 0.0,
            errors: true,
        };
        use SamplingDecision::*;
        assert_eq!(decide(&none, &remote(true), 5), RecordAndSample);
        assert_eq!(decide(&all, &remote(false), 5), Drop);
        assert_eq!(decide(&errors, &remote(false), 5), RecordOnly);
        assert_eq!(decide(&none, &Context::new(), 5), Drop);
        assert_eq!(decide(&all, &Context::new(), 5), RecordAndSample);
        assert_eq!(decide(&errors, &Context::new(), 5), RecordOnly);
        let deny = Context::new().with_value(B3Decision::Deny);
        assert_eq!(decide(&all, &deny, 5), Drop);
        let deferred = remote(false).with_value(B3Decision::Deferred);
        assert_eq!(decide(&all, &deferred, 5), RecordAndSample);
        // A ratio in between splits new traces by their id, the same way at every hop.
        let half = MeshSampler {
            ratio: 0.5,
            errors: false,
        };
        let sampled = (0..1000_u128)
            .filter(|i| {
                decide(
                    &half,
                    &Context::new(),
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                ) == RecordAndSample
            })
            .count();
        assert!((400..600).contains(&sampled), "{sampled}");
    }
}
