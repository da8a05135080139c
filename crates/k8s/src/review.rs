//! Proxies' projected service-account tokens, checked with the TokenReview API.
//!
//! The token must be valid for the audience the control plane expects (default `sinew`:
//! a token meant for the API server itself is refused), and must belong to a service
//! account (`system:serviceaccount:<namespace>:<name>`); the certificate is issued for that
//! namespace and service account.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use sinew_control::identity::{ReviewFuture, TokenReviewer, TokenSubject};

/// The audience proxies' tokens are requested for by default.
pub const DEFAULT_AUDIENCE: &str = "sinew";

/// A [`TokenReviewer`] over the API server's TokenReview API.
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: Client,
    audience: String,
}

impl KubeTokenReviewer {
    /// Reviews tokens with `client`, requiring `audience`.
    pub fn new(client: Client, audience: impl Into<String>) -> KubeTokenReviewer {
        KubeTokenReviewer {
            client,
            audience: audience.into(),
        }
    }
}

/// The namespace and name of a service-account user name.
pub fn service_account(username: &str) -> Option<TokenSubject> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| TokenSubject {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
    })
}

impl TokenReviewer for KubeTokenReviewer {
    fn review(&self, token: String) -> ReviewFuture {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let audience = self.audience.clone();
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token),
                    audiences: Some(vec![audience.clone()]),
                },
                ..TokenReview::default()
            };
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("cannot review the service-account token: {e}"))?;
            let status = answer.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                return Err(format!(
                    "the service-account token was refused by the API server{}",
                    status
                        .error
                        .filter(|e| !e.is_empty())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
            if let Some(auds) = &status.audiences
                && !auds.contains(&audience)
            {
                return Err(format!("the token is not meant for audience {audience:?}"));
            }
            let user = status.user.and_then(|u| u.username).unwrap_or_default();
            service_account(&user).ok_or_else(|| format!("{user:?} is not a service account"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_user_names() {
        let s =
            service_account("system:serviceaccount:shop:cart").unwrap_or_else(|| panic!("parsed"));
        assert_eq!(
            (s.namespace.as_str(), s.service_account.as_str()),
            ("shop", "cart")
        );
        assert!(service_account("admin").is_none());
        assert!(service_account("system:serviceaccount:shop").is_none());
    }
}
