//! The test API server itself (testkit's `kube::ApiServer`): it serves the real Kubernetes
//! API, survives an API-server restart with its state, and issues service-account tokens
//! that its TokenReview API accepts.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use sinew_testkit::kube::ApiServer;

fn named<T: kube::Resource<DynamicType = ()> + Default>(ns: Option<&str>, name: &str) -> T {
    let mut o = T::default();
    o.meta_mut().name = Some(name.to_owned());
    o.meta_mut().namespace = ns.map(str::to_owned);
    o
}

#[tokio::test]
async fn api_server_keeps_state_across_restart_and_reviews_tokens() {
    let mut server = ApiServer::start().await.expect("API server");
    let client = server.client().await.unwrap();
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(&pp, &named(None, "shop"))
        .await
        .unwrap();
    let maps = Api::<ConfigMap>::namespaced(client.clone(), "shop");
    maps.create(&pp, &named(Some("shop"), "kept"))
        .await
        .unwrap();

    server.restart_apiserver().await.expect("restart");
    let client = server.client().await.unwrap();
    let maps = Api::<ConfigMap>::namespaced(client.clone(), "shop");
    assert!(
        maps.get_opt("kept").await.unwrap().is_some(),
        "state lost across restart"
    );

    // A token for a service account, from the TokenRequest API, passes TokenReview.
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), "shop");
    sas.create(&pp, &named(Some("shop"), "cart")).await.unwrap();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["sinew".to_owned()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("cart", &pp, &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let reviews = Api::<TokenReview>::all(client.clone());
    let review = |token: String| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: Some(vec!["sinew".to_owned()]),
        },
        ..Default::default()
    };
    let ok = reviews.create(&pp, &review(token.clone())).await.unwrap();
    let status = ok.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(
        status.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:shop:cart")
    );
    // The same token with its signature changed is refused. (A character in the middle:
    // the last one of an unpadded base64 signature may carry only padding bits.)
    let mut forged: Vec<char> = token.chars().collect();
    let i = forged.len() - 10;
    forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    let refused = reviews.create(&pp, &review(forged)).await.unwrap();
    assert_ne!(refused.status.unwrap().authenticated, Some(true));
}
